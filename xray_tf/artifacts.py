"""The run directory: created fresh for every run, its files written atomically.

A run never writes into an existing run directory, and every artifact is first written under a
temporary name and then renamed, so a crash or a full disk leaves either the previous complete
file or none -- never half a ``history.csv`` or half a SavedModel.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import keras


def create_run_dir(output_dir: str, run_name: str) -> str:
    """Create and return ``output_dir/run_name``, adding ``-2``, ``-3`` ... if that name is taken."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output_dir={output_dir!r} cannot be created: {error.strerror}.") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir={output_dir!r} is not writable.")
    for attempt in range(1, 10_000):
        path = os.path.join(output_dir, run_name if attempt == 1 else f"{run_name}-{attempt}")
        try:
            os.mkdir(path)  # atomic: two runs starting together never share a directory
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"Too many runs named {run_name!r} in {output_dir}.")


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json_atomic(path: str, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def export_saved_model(model: keras.Model, path: str) -> None:
    """Export ``model``'s inference function as a TensorFlow SavedModel at ``path``.

    The serving signature takes uint8 images ``[batch, H, W, 1 or 3]`` and returns class
    probabilities; loading it needs only TensorFlow (``tf.saved_model.load``), not xray_tf.
    """
    # On JAX, Keras converts the model with jax2tf, by default with its gradient, which saving then
    # traces and stores: more than half of a ResNet50 export's time (BENCHMARKS.md section 3) for
    # a serving signature that nobody differentiates.
    options = {"jax2tf_kwargs": {"with_gradient": False}} if keras.backend.backend() == "jax" else {}
    parent = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        model.export(staging, format="tf_saved_model", verbose=False, **options)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
