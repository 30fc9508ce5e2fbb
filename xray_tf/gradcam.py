"""Grad-CAM heatmaps (Selvaraju et al., 2017) for the classifiers of ``models.build_model``.

The model is split at its backbone: ``uint8 image -> preprocessing -> backbone`` gives the feature
map ``A`` of the last convolutional block (ResNet50's ``conv5_block3_out``, DenseNet121's final
``relu``: the backbone's output), and the head layers (pooling, dropout, Dense) are applied to ``A``
by hand to get the class scores. The heatmap of class ``c`` is ``relu(sum_k alpha_k A_k)`` with
``alpha_k`` the spatial mean of ``d score_c / d A_k``, resized to the image and scaled to [0, 1].

The score is the Dense layer's output before the softmax, as in the paper: the gradient of a
softmax probability vanishes when the model is confident, which would blank the heatmap exactly
where the model is surest. Only the head is differentiated, never the backbone.

Everything is Keras 3 ops except ``_gradient``: Keras 3 has no backend-agnostic gradient op, so that
one small function calls the backend's own autodiff (TensorFlow or JAX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import matplotlib
import numpy as np
from keras import ops
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from xray_tf.config import ConfigError


def split_at_backbone(model: keras.Model) -> tuple[keras.Model, list[keras.layers.Layer]]:
    """Return ``(image -> last conv feature map, head layers)`` of a model built like ``build_model``.

    The model must be a chain: input, preprocessing layers, one nested backbone sub-model, then head
    layers ending in a Dense softmax. The feature sub-model shares the model's layers and weights.
    """
    backbones = [i for i, layer in enumerate(model.layers) if isinstance(layer, keras.Model)]
    if len(backbones) != 1:
        raise ValueError(
            f"Grad-CAM needs a model with exactly one nested backbone sub-model (as models.build_model "
            f"builds); {model.name!r} has {len(backbones)}."
        )
    split = backbones[0]
    head = model.layers[split + 1 :]
    last = head[-1] if head else None
    if not (isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax):
        raise ValueError(f"Grad-CAM needs a head ending in a Dense softmax layer; {model.name!r} ends in {last!r}.")
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
    features = inputs
    for layer in model.layers[1 : split + 1]:
        features = layer(features)
    if len(features.shape) != 4:
        raise ValueError(f"The backbone {model.layers[split].name!r} must output a [B, h, w, C] feature map, "
                         f"not shape {features.shape}.")
    return keras.Model(inputs, features, name=f"{model.name}_features"), head


def _gradient(score: Callable[[Any], Any], x: Any) -> Any:
    """``d score(x) / d x`` of a scalar ``score``, by the backend's own autodiff.

    Keras 3 has no backend-agnostic gradient op; this is the only backend-specific code of Grad-CAM.
    """
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = score(x)
        return tape.gradient(value, x)
    if backend == "jax":
        import jax

        return jax.grad(score)(x)
    raise NotImplementedError(f"Grad-CAM supports the tensorflow and jax Keras backends, not {backend!r}.")


class GradCam:
    """Grad-CAM heatmaps of ``model`` (built like ``models.build_model``) for uint8 image batches."""

    def __init__(self, model: keras.Model):
        self.features, self.head = split_at_backbone(model)
        self.image_size = tuple(model.input_shape[1:3])

    def logits(self, features: Any) -> Any:
        """Class scores before the softmax: the head applied by hand to a feature map batch."""
        x = features
        for layer in self.head[:-1]:
            x = layer(x, training=False)
        dense = self.head[-1]
        x = ops.matmul(ops.cast(x, dense.compute_dtype), dense.kernel)
        return x + dense.bias if dense.use_bias else x

    def heatmaps(self, images: np.ndarray, class_indices: np.ndarray | None = None) -> np.ndarray:
        """``float32 [B, H, W]`` in [0, 1] for uint8 ``images [B, H, W, 1 or 3]``.

        ``class_indices[b]`` is the class explained for image ``b``; default: the predicted class.
        A heatmap is all zeros where no feature speaks for the class.
        """
        features = ops.cast(self.features(images, training=False), "float32")
        if class_indices is None:
            class_indices = ops.argmax(self.logits(features), axis=-1)
        chosen = ops.expand_dims(ops.cast(class_indices, "int32"), -1)

        def score(feature_map):
            # Images are independent, so the gradient of the sum is each image's own gradient.
            return ops.sum(ops.take_along_axis(self.logits(feature_map), chosen, axis=-1))

        weights = ops.mean(_gradient(score, features), axis=(1, 2), keepdims=True)
        cam = ops.relu(ops.sum(weights * features, axis=-1, keepdims=True))
        cam = ops.image.resize(cam, self.image_size, interpolation="bilinear")
        peak = ops.max(cam, axis=(1, 2, 3), keepdims=True)
        cam = ops.clip(cam / ops.maximum(peak, 1e-12), 0.0, 1.0)
        return ops.convert_to_numpy(cam[..., 0])


def overlay(grey: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``: the uint8 grey image ``[H, W]`` under the heatmap, resized to it, in colour.

    The heatmap is blended at a constant ``alpha`` so the anatomy stays visible everywhere.
    """
    height, width = grey.shape
    resized = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize((width, height), Image.BILINEAR))
    colours = matplotlib.colormaps[colormap](np.clip(resized, 0.0, 1.0))[..., :3]
    base = np.repeat(grey[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    return np.round(255.0 * ((1.0 - alpha) * base + alpha * colours)).astype(np.uint8)


_CAPTION_DPI = 100  # the canvas' pixels per inch: sizes below are in pixels


def annotated_overlay(
    grey: np.ndarray,
    heatmap: np.ndarray,
    predicted: str,
    probability: float,
    explained: str | None = None,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """uint8 RGB: ``overlay`` under a caption (the predicted class and its probability) with a colour bar.

    The overlay keeps its pixels and size, on the left; the caption band above it and the
    colour bar right of it make the picture readable on its own, away from any table. ``explained``
    names the class the heatmap explains where that is not the predicted one.
    """
    if not 0.0 <= probability <= 1.0:
        raise ConfigError("probability", probability, "must be between 0 and 1.")
    picture = overlay(grey, heatmap, alpha, colormap)
    height, width = grey.shape
    font = max(10, width // 28)  # readable at 224 px, in proportion at 1024
    lines = [f"Predicted {predicted} (p = {probability:.2f})"]
    if explained is not None and explained != predicted:
        lines.append(f"Heatmap of {explained}")
    band, margin = int(1.5 * font * len(lines) + 0.5 * font), font // 2  # the margin: room for the bar's "0"
    bar_left, bar_width = width + font // 2, max(6, width // 24)
    caption_width = int(0.65 * font * max(len(line) for line in lines)) + font  # a generous width per character
    total_width, total_height = max(bar_left + bar_width + 5 * font, caption_width), margin + height + band
    figure = Figure(figsize=(total_width / _CAPTION_DPI, total_height / _CAPTION_DPI), dpi=_CAPTION_DPI,
                    facecolor="white")
    points = font * 72 / _CAPTION_DPI
    image_box = (0, margin / total_height, width / total_width, height / total_height)
    image_axes = figure.add_axes(image_box)
    image_axes.imshow(picture, interpolation="nearest", aspect="auto")
    image_axes.set_axis_off()
    figure.text(font / 3 / total_width, 1 - font / 4 / total_height, "\n".join(lines), fontsize=points,
                va="top", ha="left", linespacing=1.2)
    bar_axes = figure.add_axes((bar_left / total_width, *image_box[1:2], bar_width / total_width, image_box[3]))
    colour_bar = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormap), cax=bar_axes, ticks=[0.0, 0.5, 1.0])
    colour_bar.ax.tick_params(labelsize=0.8 * points, length=2)
    colour_bar.set_label("Grad-CAM", fontsize=0.8 * points, labelpad=1)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
