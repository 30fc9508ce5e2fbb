"""The SavedModel: uint8 images in, the probabilities xray-evaluate reports out, temperature included."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from xray_tf import calibration, export, models


def _serve(path: str, images: np.ndarray) -> np.ndarray:
    loaded = tf.saved_model.load(path)
    (probabilities,) = loaded.signatures["serving_default"](tf.constant(images)).values()
    return probabilities.numpy()


def test_saved_model_serves_the_temperature_scaled_probabilities(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, None), dtype="uint8", name="image")
    grey = models.XrayPreprocessing("torch")(inputs)  # 1 or 3 channels in, as the real models
    pooled = keras.layers.GlobalAveragePooling2D()(grey)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Dense(8)(pooled)))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    plain = np.asarray(model.predict_on_batch(images))
    export.export_saved_model(model, str(tmp_path / "plain"))
    export.export_saved_model(model, str(tmp_path / "calibrated"), temperature=2.0)
    np.testing.assert_allclose(_serve(str(tmp_path / "plain"), images), plain, atol=1e-6)
    served = _serve(str(tmp_path / "calibrated"), images)
    assert np.abs(served - plain).max() > 1e-3  # the temperature is in the graph
    np.testing.assert_allclose(served, calibration.apply_temperature(plain, 2.0), atol=1e-6)
