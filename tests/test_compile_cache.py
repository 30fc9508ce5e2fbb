"""The persistent compilation cache: a second process loads what the first compiled (JAX backend)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from xray_tf import compile_cache
from xray_tf.config import ConfigError, TrainConfig

COMPILE_ONCE = """
import sys
import jax, jax.numpy as jnp
from xray_tf import compile_cache
print("cache:", compile_cache.enable(sys.argv[1]))
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
"""


def _compile_in_new_process(setting: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COMPILE_ONCE, setting], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": "jax", "JAX_LOG_COMPILES": "1",
                                                       **env})


@pytest.mark.slow
def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    directory = str(tmp_path / "xla")
    first = _compile_in_new_process(directory, {})
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"cache: {directory}" in first.stdout
    assert "Persistent compilation cache hit" not in first.stderr
    assert os.listdir(directory)
    # "auto" takes JAX's own setting when the user made one.
    second = _compile_in_new_process("auto", {"JAX_COMPILATION_CACHE_DIR": directory})
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"cache: {directory}" in second.stdout
    assert "Persistent compilation cache hit for 'jit__lambda" in second.stderr  # jax < 0.7 adds a '_'


def test_the_tensorflow_backend_caches_nothing(tmp_path):
    assert compile_cache.enable(str(tmp_path / "xla")) is None
    assert not (tmp_path / "xla").exists()


def test_an_unusable_cache_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^compilation_cache='.*file/xla': cannot be created: .* is a file"):
        TrainConfig(compilation_cache=str(blocker / "xla"), output_dir=str(tmp_path / "runs")).validate()
