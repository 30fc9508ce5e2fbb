"""Grad-CAM: heatmaps the size of the image in [0, 1], on the right region, on TF and JAX.

The localisation test uses a tiny model with hand-set weights whose output depends on one image
region only: its backbone has one feature channel masked to that region and one, much stronger,
channel everywhere that the classifier ignores. Grad-CAM must follow the gradient, not the strength.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import run_under_jax
from keras import ops

from xray_tf import gradcam, models
from xray_tf.config import ConfigError

SIZE = 32
PATCH = 4  # the toy backbone's stride: one feature cell per 4 x 4 pixels
REGION = (slice(8, 16), slice(16, 28))  # rows, columns in pixels, on the feature grid


def region_model() -> keras.Model:
    """uint8 [B, 32, 32, 1] -> 2 classes; class 0's score is the mean brightness inside REGION."""
    grid = SIZE // PATCH
    mask = np.zeros((1, grid, grid, 2), np.float32)
    rows, columns = (slice(part.start // PATCH, part.stop // PATCH) for part in REGION)
    mask[0, rows, columns, 0] = 1.0
    mask[..., 1] = 5.0  # the channel the classifier ignores, five times stronger, everywhere

    backbone_input = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(2, PATCH, strides=PATCH, activation="relu", use_bias=False, name="patches")
    backbone = keras.Model(backbone_input, ops.multiply(conv(backbone_input), mask), name="toy_backbone")
    conv.set_weights([np.full((PATCH, PATCH, 3, 2), 1.0 / (PATCH * PATCH * 3), np.float32)])

    inputs = keras.Input((SIZE, SIZE, None), dtype="uint8", name="image")
    x = models.XrayPreprocessing("torch", name="preprocessing")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone(x))
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.array([[4.0, -4.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32)])
    return model


def bright_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(150, 256, (count, SIZE, SIZE, 1), dtype=np.uint8)


def test_heatmap_peaks_inside_the_region():
    model = region_model()
    images = bright_images(3)
    outside = images.copy()
    outside[:, :4] = 0  # the toy really depends on REGION only
    np.testing.assert_allclose(model.predict_on_batch(outside), model.predict_on_batch(images), atol=1e-6)

    cam = gradcam.GradCam(model)
    heatmaps = cam.heatmaps(images, np.zeros(3, np.int32))
    assert heatmaps.shape == (3, SIZE, SIZE)
    assert heatmaps.min() >= 0.0 and heatmaps.max() == pytest.approx(1.0)
    for heatmap in heatmaps:
        row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        assert REGION[0].start <= row < REGION[0].stop and REGION[1].start <= column < REGION[1].stop
        assert heatmap[REGION].mean() > 0.5 > heatmap[:4].max()
    # Class 1 is scored by the region's darkness: nothing in these bright images speaks for it.
    np.testing.assert_array_equal(cam.heatmaps(images, np.ones(3, np.int32)), 0.0)


def test_default_class_is_the_predicted_one():
    cam = gradcam.GradCam(region_model())
    images = bright_images(2, seed=1)
    np.testing.assert_allclose(cam.heatmaps(images), cam.heatmaps(images, np.zeros(2, np.int32)))


JAX_CHECK = """
import keras, test_gradcam
assert keras.config.backend() == "jax", keras.config.backend()
test_gradcam.test_heatmap_peaks_inside_the_region()
test_gradcam.test_default_class_is_the_predicted_one()
"""


def test_jax_backend_gives_the_same_localisation():
    result = run_under_jax(JAX_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("model_name", ["resnet50", "densenet121"])
def test_real_backbones_split_at_their_last_conv_block(model_name):
    model = models.build_model(model_name, 3, 64, weights="none", dropout=0.2)
    cam = gradcam.GradCam(model)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    features = cam.features(images)
    assert tuple(features.shape) == (2, 2, 2, model.get_layer(model_name).output.shape[-1])
    probabilities = ops.convert_to_numpy(ops.softmax(cam.logits(features)))
    np.testing.assert_allclose(probabilities, model.predict_on_batch(images), atol=1e-5)
    heatmaps = cam.heatmaps(images)
    assert heatmaps.shape == (2, 64, 64) and np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0


def test_a_model_without_backbone_is_refused():
    inputs = keras.Input((SIZE, SIZE, 1))
    flat = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(flat), name="flat")
    with pytest.raises(ValueError, match="nested backbone"):
        gradcam.GradCam(model)


def test_overlay_blends_the_heatmap_over_the_grey_image():
    grey = np.full((48, 40), 100, np.uint8)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[:4] = 1.0
    picture = gradcam.overlay(grey, heatmap, alpha=0.4)
    assert picture.shape == (48, 40, 3) and picture.dtype == np.uint8
    hot, cold = picture[2, 20].astype(int), picture[-2, 20].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where 1, blue where 0
    assert hot[2] == cold[0] == 60  # where the colour has no share, 60 % of the X-ray shows


def test_annotated_overlay_keeps_the_overlay_and_adds_a_caption_and_a_colour_bar():
    grey = np.full((64, 64), 100, np.uint8)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[:4] = 1.0
    plain = gradcam.overlay(grey, heatmap)
    picture = gradcam.annotated_overlay(grey, heatmap, "COVID-19", 0.87)
    band = picture.shape[0] - 64 - 5  # the caption above, a margin of half the 10 px font below
    assert picture.dtype == np.uint8 and picture.shape[2] == 3 and band > 0 and picture.shape[1] > 64
    np.testing.assert_array_equal(picture[band:band + 64, :64], plain)
    assert picture[:band].min() < 100  # dark caption text on the white band
    right = picture[band:band + 64, 64:].astype(int)
    bar = right[:, np.argmax(right.std(axis=(0, 2)))]  # the column that changes colour most: the bar's
    (top_red, _, top_blue), (bottom_red, _, bottom_blue) = bar[1], bar[-2]
    assert top_red > top_blue and bottom_blue > bottom_red  # jet: 1 at the top of the bar, 0 at the bottom
    with_explained = gradcam.annotated_overlay(grey, heatmap, "COVID-19", 0.87, explained="Normal")
    assert with_explained.shape[0] > picture.shape[0]  # a second caption line
    with pytest.raises(ConfigError, match="probability=1.5"):
        gradcam.annotated_overlay(grey, heatmap, "COVID-19", 1.5)
