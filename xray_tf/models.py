"""Keras classifiers for chest X-rays: preprocessing layer + backbone + softmax head.

The model takes raw ``uint8`` pixels of shape ``[batch, H, W, C]`` with C = 1 (grey, what the
input pipeline produces) or 3 (RGB). Its first layer casts to float, averages the channels to grey
(X-rays saved as RGB carry three equal channels), repeats the grey channel three times and applies
the normalisation the backbone was trained with, so the host feeds 4x fewer bytes than float32 and
an exported SavedModel serves raw images. Only Keras 3 APIs are used here, so the same code runs on
the TensorFlow and JAX backends.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator

import keras
from keras import ops

from xray_tf import metrics, optimizers
from xray_tf.backbones import BACKBONES
from xray_tf.config import MODELS, ConfigError
from xray_tf.rundir import BACKBONE_INFO, RunError

# ImageNet statistics. ResNet50 (Keras "caffe" mode) subtracts the BGR means on the 0-255 scale;
# the DenseNets and CheXNet ("torch" mode) scale to [0, 1] and standardise with RGB mean and std.
# A grey image repeated to three channels is the same in RGB and BGR order, so only the
# per-channel order of the constants matters.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_RGB_MEAN = (0.485, 0.456, 0.406)
_TORCH_RGB_STD = (0.229, 0.224, 0.225)
NORMALIZATION_MODES = ("caffe", "torch", "tf", "raw")


@keras.saving.register_keras_serializable(package="xray_tf")
class XrayPreprocessing(keras.layers.Layer):
    """uint8 grey or RGB pixels -> 3-channel float tensor normalised for an ImageNet backbone.

    Applied to the grey image repeated to 3 channels: ``mode="caffe"`` reproduces
    ``keras.applications.resnet50.preprocess_input`` (BGR, mean subtraction on 0-255);
    ``"torch"`` reproduces ``densenet.preprocess_input`` (RGB scaled to [0, 1], ImageNet mean/std);
    ``"tf"`` reproduces ``resnet_v2.preprocess_input`` (``x / 127.5 - 1``, in [-1, 1]); ``"raw"``
    passes floats on 0-255, for the applications that rescale them themselves. The channel count may
    be unknown until run time, so one SavedModel serves grey and RGB input.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"Unknown normalisation mode {mode!r}; expected one of {', '.join(NORMALIZATION_MODES)}.")
        self.mode = mode

    def call(self, images):
        grey = ops.mean(ops.cast(images, "float32"), axis=-1, keepdims=True)
        x = ops.repeat(grey, 3, axis=-1)
        if self.mode == "caffe":
            x = x[..., ::-1] - ops.convert_to_tensor(_CAFFE_BGR_MEAN, "float32")
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_RGB_MEAN, "float32")
            std = ops.convert_to_tensor(_TORCH_RGB_STD, "float32")
            x = (x / 255.0 - mean) / std
        # "raw": 0-255 as it is, which the application's own first layers rescale.
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# Where keras.applications downloads weights="imagenet" from (each application's BASE_WEIGHTS_PATH): this
# + the registry's imagenet_weights, into the Keras cache's models/ folder under the file's name.
_IMAGENET_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"
_CONNECT_TIMEOUT_S = 5.0


def _keras_cache_dir() -> str:
    """The folder ``keras.utils.get_file`` downloads application weights into, by Keras' own rule.

    Keras reads ``$KERAS_HOME`` once, at import (keras/src/backend/config.py), and falls back to
    ``/tmp/.keras`` where its folder is not writable (keras/src/utils/file_utils.py); this reads
    the variable now, which is the same for any program that does not change it while it runs.
    """
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return os.path.join(home, "models")


def _download_route(url: str) -> tuple[str, int]:
    """The host and port that urllib, and so Keras' downloader, connects to for ``url``: a proxy if one is set."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname, proxy_parts.port or 80
    return parts.hostname, parts.port or 443


def _host_answers(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds; nothing is sent.

    The attempt runs in a daemon thread so that the name lookup, which no socket timeout bounds,
    cannot hold the caller longer either.
    """
    answered, done = [], threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass  # refused, unreachable or unknown: the host does not answer
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(answered)


def check_weights_available(model: str, weights: str) -> None:
    """Refuse ``weights="imagenet"`` when Keras could neither find nor download the backbone's weights.

    Keras downloads them on first use, once, into its cache; offline, that download fails deep in
    Keras after the data has been decoded. This looks for the cached file and otherwise opens one
    connection to the download host (a few seconds at most, nothing downloaded). "none", a weights
    file, and the CheXNet model (whose trunk comes from ``chexnet_weights``) need nothing.
    """
    if model not in MODELS:
        raise ConfigError("model", model, f"not one of {', '.join(MODELS)}.")
    if weights != "imagenet" or BACKBONES[model].imagenet_weights is None:
        return
    url = _IMAGENET_ORIGIN + BACKBONES[model].imagenet_weights
    cached = os.path.join(_keras_cache_dir(), os.path.basename(url))
    if os.path.isfile(cached):
        return
    host, port = _download_route(url)
    if _host_answers(host, port, _CONNECT_TIMEOUT_S):
        return
    raise ConfigError("weights", "imagenet", (
        f"Keras downloads {model}'s ImageNet weights on first use into {cached}, which does not exist, and "
        f"{host}:{port} cannot be reached (no connection within {_CONNECT_TIMEOUT_S:g} s). Either train from "
        f"scratch with --weights=none; or fetch {url} on a machine with a network and pass the file as "
        f"--weights=PATH (or copy it to {cached}); or run once with a network connection, after which the "
        "cached file is used offline."))


def _resolve_weights(weights: str) -> str | None:
    """Map the ``weights`` setting onto what ``keras.applications`` accepts at build time."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return None
    if not os.path.isfile(weights):
        raise ConfigError("weights", weights, "expected 'imagenet', 'none' or an existing weights file.")
    return None  # built empty, then loaded from the file by build_backbone


def build_backbone(
    model_name: str,
    image_size: int,
    weights: str = "imagenet",
    chexnet_weights: str | None = None,
) -> keras.Model:
    """Return the convolutional trunk (no head) taking 3-channel float images normalised as its registry entry says."""
    if model_name not in MODELS:
        raise ConfigError("model", model_name, f"not one of {', '.join(MODELS)}.")
    if model_name == "densenet_chexnet":
        if not chexnet_weights:
            raise ConfigError("chexnet_weights", None, "model densenet_chexnet needs a converted CheXNet file.")
        from xray_tf import chexnet  # imported lazily: only this model needs it

        return chexnet.load_chexnet_backbone(chexnet_weights, image_size)
    if model_name == "densenet121" and weights.endswith((".pth", ".pt", ".pth.tar")):
        from xray_tf import (
            chexnet,  # converts torchvision's PyTorch checkpoint in memory
        )

        return chexnet.densenet121_backbone_from_torch(weights, image_size)

    entry = BACKBONES[model_name]
    constructor = getattr(keras.applications, entry.constructor)
    input_shape = (image_size, image_size, 3)
    backbone = constructor(include_top=False, weights=_resolve_weights(weights), input_shape=input_shape)
    if entry.batch_norm_momentum is not None:  # see xray_tf.backbones
        for layer in _batch_norms(backbone):
            layer.momentum = entry.batch_norm_momentum
    if weights not in ("imagenet", "none"):
        with warnings.catch_warnings(record=True) as caught:  # a mismatching file warns once per layer
            warnings.simplefilter("always")
            try:
                backbone.load_weights(weights)
            except Exception as error:  # Keras raises several types for a mismatching file
                raise ConfigError("weights", weights, _weights_mismatch(weights, model_name, error)) from error
        for warning in caught:  # the weights loaded: what Keras noticed on the way is worth seeing
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return backbone


def _weights_mismatch(weights: str, model_name: str, error: Exception) -> str:
    """Why ``weights`` does not load into ``model_name``: the backbone it holds when xray-pretrain says so."""
    info = os.path.join(os.path.dirname(os.path.abspath(weights)), BACKBONE_INFO)
    try:
        with open(info) as handle:
            pretrained = json.load(handle).get("model")
    except (OSError, ValueError, AttributeError):  # no description beside it, or not xray-pretrain's
        pretrained = None
    if isinstance(pretrained, str) and pretrained != model_name:
        return (f"holds a {pretrained} backbone ({info}), not a {model_name} one: pass --model={pretrained} or "
                f"pretrain a {model_name}.")
    return f"does not fit a {model_name} backbone without its top: {_keras_reason(error)}"


def build_model(model_name: str, num_classes: int, image_size: int, weights: str = "imagenet", dropout: float = 0.0,
                chexnet_weights: str | None = None) -> keras.Model:
    """Build ``uint8 [B, H, W, 1 or 3] -> class probabilities [B, num_classes]``.

    The head is global average pooling, dropout and a Dense softmax kept in float32 so that
    probabilities stay accurate under mixed precision.
    """
    if model_name not in MODELS:
        raise ConfigError("model", model_name, f"not one of {', '.join(MODELS)}.")
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {num_classes}.")
    backbone = build_backbone(model_name, image_size, weights, chexnet_weights)
    inputs = keras.Input((image_size, image_size, None), dtype="uint8", name="image")
    x = XrayPreprocessing(BACKBONES[model_name].normalization, name="preprocessing")(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"xray_{model_name}")


# What a saved model names besides Keras' own classes: needed to rebuild it in any program.
_CUSTOM_OBJECTS = {"xray_tf>XrayPreprocessing": XrayPreprocessing, "xray_tf>ClassRecall": metrics.ClassRecall,
                   "xray_tf>BalancedAccuracy": metrics.BalancedAccuracy, **optimizers.CUSTOM_OBJECTS}
# Where Keras' errors turn from the diagnosis to quoting configs and arrays or to advice for developers.
_END_OF_DIAGNOSIS = re.compile(r"Full object config:|config=|Target variable:|Make sure custom classes")
_MAX_REASON = 300  # characters of Keras' own explanation


def load_model(path: str, compile: bool = True) -> keras.Model:
    """Load a ``.keras`` file written by training, with ``safe_mode`` (no code runs from the file).

    A file that is not one (a folder, another format, a truncated zip, a config naming a class that
    neither Keras nor xray_tf defines, a Lambda layer's code) is refused with a RunError that
    names it and says what is wrong in one line. ``compile=False`` skips the optimizer and
    metrics, which predicting does not need.
    """
    if not os.path.isfile(path):
        raise RunError(f"{path}: {'a folder, not a .keras model file' if os.path.isdir(path) else 'no such file'}.")
    if not path.endswith(".keras"):  # Keras picks the format by name: .h5 would go to its legacy loader
        raise RunError(f"{path}: not a .keras model file (the name must end in .keras).")
    if os.path.getsize(path) == 0:
        raise RunError(f"{path}: an empty file, not a .keras model (an interrupted write?).")
    if not zipfile.is_zipfile(path):
        raise RunError(f"{path}: not a zip archive, as a .keras model file is (truncated, or another format?).")
    with warnings.catch_warnings(record=True) as caught:  # Keras warns on its way to refusing a broken file
        try:
            model = keras.saving.load_model(path, custom_objects=_CUSTOM_OBJECTS, compile=compile, safe_mode=True)
        except Exception as error:  # the file is input: Keras fails on a foreign one with many types
            raise RunError(f"{path}: cannot be loaded as a Keras model: {_keras_reason(error)}") from error
    for warning in caught:  # the model loaded: what Keras noticed on the way is worth seeing
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model


def _keras_reason(error: Exception) -> str:
    """Keras' refusal in one line: the innermost message, without the configs and arrays it quotes."""
    message = str(error).rsplit("Exception encountered:", 1)[-1]
    message = " ".join(_END_OF_DIAGNOSIS.split(message, 1)[0].split())
    reason = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if len(reason) > _MAX_REASON:  # Keras' advice to developers follows its diagnosis: keep whole sentences
        end = reason.rfind(". ", 0, _MAX_REASON)
        reason = reason[:end + 1] if end > 0 else reason[:_MAX_REASON] + " [...]"
    return reason if reason.endswith((".", "]")) else reason + "."


def model_from_config(config: dict) -> keras.Model:
    """The compiled model ``keras.saving.serialize_keras_object`` described, with fresh weights.

    The same rebuild as ``load_model`` without a file: training uses it to write the best epoch's
    ``.keras`` from a backup, on one device, without touching the model that trained.
    """
    # Keras pops entries from the config it deserializes: a copy leaves the caller's intact.
    return keras.saving.deserialize_keras_object(copy.deepcopy(config), custom_objects=_CUSTOM_OBJECTS, safe_mode=True)


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a classifier or pretraining encoder: its one nested model."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def _batch_norms(model: keras.Model) -> Iterator[keras.layers.BatchNormalization]:
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            yield layer
        elif isinstance(layer, keras.Model):  # the backbone is a nested model
            yield from _batch_norms(layer)


def synchronize_batch_norm(model: keras.Model) -> None:
    """Compute BatchNormalization statistics over the global batch, across replicas (TensorFlow).

    Under ``tf.distribute`` each replica otherwise normalises with the statistics of its own share
    of the batch, so training with N replicas differs from one device with the same global batch.
    JAX's ``DataParallel`` computes them over the global batch already. Call before the first step.
    """
    for layer in _batch_norms(model):
        layer.synchronized = True


@contextlib.contextmanager
def portable_batch_norm(model: keras.Model) -> Iterator[None]:
    """Within the block, BatchNormalization layers say ``synchronized=False``: for saving.

    The flag only matters while training on several replicas, and a ``.keras`` file that carries
    ``synchronized=True`` loads on the TensorFlow backend only.
    """
    layers = [layer for layer in _batch_norms(model) if layer.synchronized]
    for layer in layers:
        layer.synchronized = False
    try:
        yield
    finally:
        for layer in layers:
            layer.synchronized = True


@contextlib.contextmanager
def global_dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` within the block, the previous one restored after.

    Models are built under the run's policy (``mixed_bfloat16`` on a GPU) without leaving it set
    for the caller's later models.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
