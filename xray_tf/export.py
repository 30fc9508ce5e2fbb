"""The model as files that users ship: a TensorFlow SavedModel that takes raw uint8 pixels."""

from __future__ import annotations

import os
import shutil

import keras

from xray_tf import rundir


def export_saved_model(model: keras.Model, path: str) -> None:
    """Export ``model``'s inference function as a TensorFlow SavedModel at ``path`` (replaced if present).

    The serving signature takes uint8 images ``[batch, H, W, 1 or 3]`` and returns class
    probabilities; loading it needs only TensorFlow (``tf.saved_model.load``), not xray_tf.
    """
    # On JAX, Keras converts the model with jax2tf, by default with its gradient, which saving then
    # traces and stores: most of an export's time, for a serving signature nobody differentiates.
    options = {"jax2tf_kwargs": {"with_gradient": False}} if keras.backend.backend() == "jax" else {}
    if os.path.isdir(path):  # a resumed run's export from before the kill: the same best epoch
        shutil.rmtree(path)
    rundir.write_atomic(path, lambda staging: model.export(staging, format="tf_saved_model", verbose=False,
                                                           **options), directory=True)
