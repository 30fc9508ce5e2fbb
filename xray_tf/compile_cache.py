"""A persistent cache of compiled XLA programs (JAX backend), so that a rerun skips compilation.

Every run with the same model, image size, batch size, loss and device compiles the same train,
evaluation and predict steps. On a GPU that is most of a short run's overhead (BENCHMARKS.md). JAX can
keep the compiled executables on disk, keyed by the program, the device and the compiler version
and flags, and load them instead of compiling: a changed model, flag or JAX version is a new key,
never a stale program. Only XLA compilation is saved; tracing and lowering still run each time.

The TensorFlow backend has no such cache here (on a CPU it does not compile with XLA at all).
"""

from __future__ import annotations

import logging
import os

import keras

import xray_tf
from xray_tf.config import COMPILATION_CACHE_AUTO, COMPILATION_CACHE_OFF, ConfigError

logger = logging.getLogger(__name__)

def default_dir() -> str:
    return os.path.join(xray_tf.cache_dir(), "jax-compilation")


def enable(setting: str) -> str | None:
    """Cache compiled programs as ``setting`` (``--compilation_cache``) says; return the directory.

    ``setting`` is ``"auto"``, ``"none"`` or a directory. Returns None when nothing is cached:
    ``"none"``, the TensorFlow backend, or an ``"auto"`` directory that cannot be written (a
    warning says so; the program goes on, compiling as usual). Call before the first compilation.
    Raises ConfigError when a directory that was asked for cannot be created.
    """
    if setting == COMPILATION_CACHE_OFF or keras.backend.backend() != "jax":
        return None
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    directory = setting
    if setting == COMPILATION_CACHE_AUTO:
        directory = jax.config.jax_compilation_cache_dir or default_dir()
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            logger.warning("No compilation cache: %s cannot be created (%s); every program is compiled.",
                           directory, error.strerror)
            return None
        if not os.access(directory, os.W_OK | os.X_OK):
            logger.warning("No compilation cache: %s is not writable; every program is compiled.", directory)
            return None
    else:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise ConfigError("compilation_cache", setting, f"cannot be created ({error.strerror}).") from None
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # JAX reads the directory once, at its first compilation
    # JAX keeps only programs that took over a second to compile; the many small ones of model
    # building (one random initialiser per weight shape) add up to seconds as well.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logger.info("Compiled XLA programs are cached in %s (--compilation_cache=none turns this off).", directory)
    return directory
