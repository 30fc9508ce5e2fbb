"""How much host memory a run will want, checked before any image is decoded.

One flag can ask for more memory than the machine has (``--batch_size=100000``, a 2048 px cache of
the whole dataset), and the kernel then kills the run half-way, leaving a half-made run directory.
``check_memory`` estimates the two big costs -- the decoded-image cache and one training step's
activations -- and refuses a run whose estimate exceeds the memory available now, naming the flag
and the estimate. The activation figures are rough upper estimates for float32 training on the
CPU (forward activations kept for the backward pass, and their gradients); they are meant to
catch impossible settings, not to tune a batch size.

Only the standard library is imported, so the check runs before TensorFlow starts.
"""

from __future__ import annotations

import os

from xray_tf.backbones import BACKBONES

_MODEL_BYTES = 1 << 30  # weights, gradients and Adam's two moments of a 25M-parameter model, with slack


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gigabytes(size: int) -> str:
    return f"{size / 2**30:.1f} GB"


def memory_problems(model: str, image_size: int, batch_size: int, cached_images: int,
                    available: int | None, step_on_host: bool = True) -> list[str]:
    """What would exhaust ``available`` bytes, one message per cause naming its flag; [] when it fits.

    ``cached_images`` is the number of images held in memory (0 when the cache is a directory or
    off); ``available`` None skips the check (a system that does not say); ``step_on_host`` False
    leaves the training step out, for an accelerator whose own memory holds it.
    """
    if available is None:
        return []
    pixels = image_size * image_size
    cache = cached_images * pixels
    step = batch_size * pixels * BACKBONES[model].step_bytes_per_pixel + _MODEL_BYTES
    problems = []
    if cache > available:
        problems.append(f"--cache=memory: {cached_images} images of {image_size} x {image_size} px need "
                        f"{_gigabytes(cache)}, but {_gigabytes(available)} of memory is available; use "
                        f"--cache=DIR (a memory-mapped file), or a smaller --image_size.")
    if step_on_host and step > available - min(cache, available):
        problems.append(f"--batch_size={batch_size}: a training step of {model} at {image_size} px needs about "
                        f"{_gigabytes(step)} (estimated), but {_gigabytes(available - min(cache, available))} of "
                        f"memory is available{' besides the image cache' if cache else ''}; lower --batch_size "
                        f"or --image_size.")
    return problems
