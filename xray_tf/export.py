"""The model as files that users ship: a TensorFlow SavedModel that takes raw uint8 pixels."""

from __future__ import annotations

import os
import shutil

import keras
from keras import ops

from xray_tf import rundir


class _Temperature(keras.layers.Layer):
    """``softmax(log(p) / T)``: ``calibration.apply_temperature`` inside the served graph."""

    def __init__(self, temperature: float, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities):
        # A softmax that underflowed to 0 would give log 0; the smallest positive float32 stands in.
        logits = ops.log(ops.maximum(ops.cast(probabilities, "float32"), 1.1754944e-38))
        return ops.softmax(logits / self.temperature, axis=-1)


def export_saved_model(model: keras.Model, path: str, temperature: float | None = None) -> None:
    """Export ``model``'s inference function as a TensorFlow SavedModel at ``path`` (replaced if present).

    The serving signature takes uint8 images ``[batch, H, W, 1 or 3]`` and returns class
    probabilities, temperature-scaled when ``temperature`` is given (the run's ``calibration.json``),
    so a server gets what ``xray-evaluate`` and ``xray-predict`` report; loading it needs only
    TensorFlow (``tf.saved_model.load``), not xray_tf.
    """
    if temperature is not None:
        inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
        model = keras.Model(inputs, _Temperature(temperature, name="temperature")(model(inputs)), name=model.name)
    # On JAX, Keras converts the model with jax2tf, by default with its gradient, which saving then
    # traces and stores: most of an export's time, for a serving signature nobody differentiates.
    options = {"jax2tf_kwargs": {"with_gradient": False}} if keras.backend.backend() == "jax" else {}
    if os.path.isdir(path):  # a resumed run's export from before the kill: the same best epoch
        shutil.rmtree(path)
    rundir.write_atomic(path, lambda staging: model.export(staging, format="tf_saved_model", verbose=False,
                                                           **options), directory=True)
