"""Model construction: the uint8 preprocessing, the float32 head, weights files, the ImageNet weights check."""

from __future__ import annotations

import os
import socket

import keras
import numpy as np
import pytest
from keras import ops

from xray_tf import cli, models
from xray_tf.backbones import BACKBONES
from xray_tf.config import ConfigError

# The backbones Keras downloads ImageNet weights for (CheXNet's trunk comes from its own file).
IMAGENET_MODELS = [name for name, entry in BACKBONES.items() if entry.imagenet_weights]


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype("uint8")


def test_densenet_chexnet_builds_from_a_converted_weights_file(tmp_path):
    chexnet = pytest.importorskip("xray_tf.chexnet", reason="the CheXNet converter is not in this checkout")
    path = str(tmp_path / "chexnet.weights.h5")
    chexnet.build_chexnet(32).save_weights(path)
    model = models.build_model("densenet_chexnet", 2, 32, weights="none", chexnet_weights=path)
    probabilities = ops.convert_to_numpy(model(random_images((2, 32, 32, 1)), training=False))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("mode, reference", [
    ("caffe", keras.applications.resnet50.preprocess_input),
    ("torch", keras.applications.densenet.preprocess_input),
    ("tf", keras.applications.resnet_v2.preprocess_input),
])
def test_preprocessing_matches_keras_applications(mode, reference):
    grey = random_images((2, 8, 8, 1))
    expected = reference(np.repeat(grey, 3, axis=-1).astype("float32"))
    layer = models.XrayPreprocessing(mode)
    assert np.allclose(ops.convert_to_numpy(layer(grey)), expected, atol=1e-4)
    # RGB with three equal channels (how many X-rays are stored) gives the same input.
    assert np.allclose(ops.convert_to_numpy(layer(np.repeat(grey, 3, axis=-1))), expected, atol=1e-4)


def test_mixed_precision_keeps_probabilities_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = models.build_model("resnet50", 3, 32, weights="none")
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("preprocessing").compute_dtype == "bfloat16"
    output = model(random_images((2, 32, 32, 1)), training=False)
    assert ops.convert_to_numpy(output).dtype == np.float32


# Loading DenseNet121 weights into ResNet50 on purpose: Keras warns about each layer before it fails.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="^model='vgg16': not one of"):
        models.build_model("vgg16", 4, 32, weights="none")
    with pytest.raises(ConfigError, match="^weights='/nonexistent.h5': expected 'imagenet', 'none' or an existing"):
        models.build_model("resnet50", 4, 32, weights="/nonexistent.h5")
    with pytest.raises(ConfigError, match="^chexnet_weights=None: .*needs a converted CheXNet file"):
        models.build_model("densenet_chexnet", 4, 32, weights="none")
    wrong = tmp_path / "densenet.weights.h5"
    models.build_backbone("densenet121", 32, weights="none").save_weights(str(wrong))
    with pytest.raises(ConfigError, match="^weights='.*densenet.weights.h5': does not fit a resnet50 backbone"):
        models.build_model("resnet50", 4, 32, weights=str(wrong))


def test_backbone_weights_file_is_loaded(tmp_path):
    source = models.build_backbone("resnet50", 32, weights="none")
    path = str(tmp_path / "resnet.weights.h5")
    source.save_weights(path)
    model = models.build_model("resnet50", 4, 32, weights=path)
    loaded = model.get_layer("resnet50").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(loaded, source.get_weights()))


# --- check_weights_available: never a download, never a real connection --------------------------

@pytest.fixture
def empty_keras_home(tmp_path, monkeypatch) -> str:
    """``$KERAS_HOME`` an empty folder: no cached weights."""
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return str(home)


def _no_connection_expected(*args):
    raise AssertionError(f"a connection was attempted: {args}")


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_weights_offline_are_refused_with_the_ways_on(name, empty_keras_home, monkeypatch, capfd):
    attempts = []
    monkeypatch.setattr(models, "_host_answers", lambda *args: attempts.append(args) or False)
    with pytest.raises(SystemExit) as exited:
        cli.reports_errors("xray-train")(lambda argv: models.check_weights_available(name, "imagenet"))(["xray-train"])
    message = exited.value.code
    cached = os.path.join(empty_keras_home, "models", os.path.basename(BACKBONES[name].imagenet_weights))
    assert isinstance(message, str) and message.startswith("xray-train: error: --weights=imagenet: ")  # status 1
    assert cached in message and f"keras-applications/{BACKBONES[name].imagenet_weights} " in message
    assert "storage.googleapis.com" in message and "\n" not in message
    assert "--weights=none" in message and "--weights=PATH" in message and "network connection" in message
    assert len(attempts) == 1 and attempts[0][2] <= 10  # one attempt, a few seconds at most
    assert "Traceback" not in capfd.readouterr().err
    assert os.listdir(empty_keras_home) == []  # nothing downloaded, nothing created


def test_cached_imagenet_weights_need_no_connection(empty_keras_home, monkeypatch):
    monkeypatch.setattr(models, "_host_answers", _no_connection_expected)
    os.mkdir(os.path.join(empty_keras_home, "models"))
    for name in IMAGENET_MODELS:
        with open(os.path.join(empty_keras_home, "models", os.path.basename(BACKBONES[name].imagenet_weights)), "wb"):
            pass  # only its presence is checked
        models.check_weights_available(name, "imagenet")


def test_weights_other_than_imagenet_need_no_check(empty_keras_home, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_host_answers", _no_connection_expected)
    weights_file = tmp_path / "backbone.weights.h5"
    weights_file.write_bytes(b"")
    for model, weights in [("resnet50", "none"), ("densenet121", str(weights_file)), ("densenet_chexnet", "imagenet")]:
        models.check_weights_available(model, weights)
    with pytest.raises(ConfigError, match="^model='vgg16': not one of"):
        models.check_weights_available("vgg16", "imagenet")


def test_connection_check_opens_a_local_port_and_not_a_closed_one():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert models._host_answers("127.0.0.1", port, timeout=2.0)
    assert not models._host_answers("127.0.0.1", port, timeout=2.0)  # closed now: refused at once


def test_the_download_goes_through_the_proxy_urllib_would_use(monkeypatch):
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    url = "https://storage.googleapis.com/tensorflow/keras-applications/x.h5"
    assert models._download_route(url) == ("storage.googleapis.com", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert models._download_route(url) == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "googleapis.com")
    assert models._download_route(url) == ("storage.googleapis.com", 443)
