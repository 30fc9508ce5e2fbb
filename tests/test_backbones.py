"""The backbone registry: each entry builds, normalises as it says, has Grad-CAM heatmaps, ships, and names the
ImageNet file Keras downloads.

Keras creates a backbone's layers one by one in Python, which is most of each test's time, so a test builds one
model and checks all it can on it. The deepest backbones, whose code a lighter one of their family runs in the
normal tier, and the slowest to write to files are in the slow tier. Nothing is downloaded.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from keras.src.utils import file_utils  # the module whose get_file keras.applications calls

from xray_tf import backbones, calibration, config, export, gradcam, models
from xray_tf.backbones import BACKBONES

SIZE = config.MIN_IMAGE_SIZE
APPLICATIONS = [name for name, entry in BACKBONES.items() if entry.constructor]  # CheXNet's: test_chexnet
# The files users ship, for the backbones whose layers no other test exports (test_predict: resnet50;
# the runs: mobilenetv3small): resnet50v2, densenet169 and efficientnetv2s are made of the standard
# layers those two and efficientnetv2b0 use, and each export costs half a minute of the suite's 12.
SHIPPED = ["efficientnetv2b0", "convnext_tiny", "mobilenetv3small"]
HEAVY = {"densenet169", "efficientnetv2s"}  # the slowest to build; densenet121 and efficientnetv2b0 share their code
SLOW_TO_SHIP = set(SHIPPED) - {"mobilenetv3small"}  # exporting takes longest: the smallest stands for them
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"


def tiered(names: list[str], slow: set[str]) -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


def random_images(channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, SIZE, SIZE, channels), dtype=np.uint8)


def test_every_entry_names_an_application_and_a_normalisation():
    assert backbones.MODELS == tuple(BACKBONES) and config.MODELS == backbones.MODELS
    for name, entry in BACKBONES.items():
        assert entry.normalization in models.NORMALIZATION_MODES, name
        assert entry.description.endswith("."), name
        if entry.constructor is None:  # built by xray_tf.chexnet from its own file: nothing to download
            assert entry.imagenet_weights is None, name
        else:
            assert callable(getattr(keras.applications, entry.constructor)), name


@pytest.mark.parametrize("name", tiered(APPLICATIONS, HEAVY))
def test_backbone_gives_probabilities_and_heatmaps(name):
    model = models.build_model(name, num_classes=3, image_size=SIZE, weights="none", dropout=0.2)
    assert model.input.dtype == "uint8"
    grey = random_images(1)
    for images in (grey, random_images(3, seed=1)):
        probabilities = ops.convert_to_numpy(model(images, training=False))
        assert probabilities.shape == (2, 3) and probabilities.dtype == np.float32
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5) and (probabilities >= 0).all()
    cam = gradcam.GradCam(model)
    logits = cam.logits(ops.cast(cam.features(grey), "float32"))
    np.testing.assert_allclose(ops.convert_to_numpy(ops.softmax(logits)), model(grey, training=False), atol=1e-5)
    heatmaps = cam.heatmaps(grey)
    assert heatmaps.shape == (2, SIZE, SIZE) and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    # "raw" hands 0-255 to the application, so exactly those rescale in their first layer.
    (backbone,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    rescales = isinstance(backbone.layers[1], (keras.layers.Rescaling, keras.layers.Normalization))
    assert rescales == (BACKBONES[name].normalization == "raw"), backbone.layers[1]


def test_tf_and_raw_modes_on_known_pixels():
    grey = np.array([0, 51, 128, 255], np.uint8).reshape(1, 2, 2, 1)
    rgb = np.array([[10, 20, 30], [0, 0, 3]], np.uint8).reshape(1, 1, 2, 3)  # greys 20 and 1
    tf_mode, raw_mode = models.XrayPreprocessing("tf"), models.XrayPreprocessing("raw")
    np.testing.assert_allclose(ops.convert_to_numpy(tf_mode(grey))[..., 0].ravel(), [-1.0, -0.6, 0.5 / 127.5, 1.0],
                               atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(tf_mode(rgb))[0, 0, :, 2], [20 / 127.5 - 1, 1 / 127.5 - 1],
                               atol=1e-6)
    np.testing.assert_array_equal(ops.convert_to_numpy(raw_mode(grey)), np.repeat(grey, 3, -1).astype(np.float32))
    raw = ops.convert_to_numpy(raw_mode(rgb))
    assert raw.dtype == np.float32 and raw.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(raw, np.array([20.0, 1.0], np.float32)[None, None, :, None].repeat(3, -1))
    with pytest.raises(ValueError, match="Unknown normalisation mode 'inception'"):
        models.XrayPreprocessing("inception")


class _Requested(Exception):
    """Raised by the fake download: which file Keras asked for is all the test needs."""


# keras.applications warns that weights for 224 px are used at another size (MobileNetV3).
@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square:UserWarning")
@pytest.mark.parametrize("name", [name for name in APPLICATIONS if BACKBONES[name].imagenet_weights])
def test_imagenet_weights_are_the_file_keras_downloads(name, monkeypatch):
    requested = []

    def get_file(fname, origin, **kwargs):
        requested.append((fname, origin, kwargs.get("cache_subdir")))
        raise _Requested

    monkeypatch.setattr(file_utils, "get_file", get_file)
    with pytest.raises(_Requested):
        models.build_backbone(name, SIZE, weights="imagenet")
    path = BACKBONES[name].imagenet_weights
    assert requested == [(os.path.basename(path), KERAS_ORIGIN + path, "models")]


@pytest.mark.parametrize("name", tiered(SHIPPED, SLOW_TO_SHIP))
def test_keras_file_and_saved_model_give_the_models_probabilities(name, tmp_path):
    model = models.build_model(name, num_classes=3, image_size=SIZE, weights="none")
    grey, rgb = random_images(1), random_images(3, seed=1)
    model.save(str(tmp_path / "model.keras"))  # training's file, which evaluation and Grad-CAM load
    loaded = models.load_model(str(tmp_path / "model.keras"), compile=False)
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(grey, training=False)),
                               ops.convert_to_numpy(model(grey, training=False)), atol=1e-6)
    export.export_saved_model(model, str(tmp_path / "saved_model"), temperature=2.0)
    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    for images in (grey, rgb):
        (served,) = serve(tf.constant(images)).values()
        expected = calibration.apply_temperature(ops.convert_to_numpy(model(images, training=False)), 2.0)
        np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)


def test_a_backbone_can_set_its_batch_norm_momentum():
    """MobileNetV3's own 0.999 leaves inference-mode statistics near their start in a short run (backbones.py)."""
    backbone = models.build_backbone("mobilenetv3small", SIZE, "none")
    momenta = {layer.momentum for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {BACKBONES["mobilenetv3small"].batch_norm_momentum} == {0.99}
    assert BACKBONES["resnet50"].batch_norm_momentum is None  # the others keep their application's
