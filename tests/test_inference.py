"""Probabilities from image batches: test-time augmentation, ensembles, temperatures, padding, column names."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from xray_tf import calibration, inference
from xray_tf.config import ConfigError

SIZE = 32
CLASSES = ("Normal", "Bacteria", "COVID-19")


def tiny_model(pooled: bool, seed: int = 0) -> keras.Model:
    """uint8 images -> 3 probabilities. ``pooled``: a 1x1 convolution, then the mean over all pixels, which no
    mirror image changes (flip-invariant by construction); else a dense layer on the flattened pixels."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if pooled:
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 1, activation="relu")(x))
    else:
        x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, SIZE)[None, None, :, None]  # left to right, so a mirror image differs
    return np.clip(ramp + rng.normal(0, 30, (7, SIZE, SIZE, 1)), 0, 255).astype(np.uint8)


def probabilities(model: keras.Model, images: np.ndarray, tta: str = "none", batch_size: int = 4,
                  copies: int = 1) -> np.ndarray:
    members = [inference.keras_member(model)] * copies
    return inference.ensemble_probabilities(members, inference.batches_of(images, batch_size), batch_size, tta)


def test_flip_on_a_flip_invariant_model_equals_no_tta(images):
    model = tiny_model(pooled=True)
    plain = probabilities(model, images)
    np.testing.assert_allclose(probabilities(model, images, "flip"), plain, atol=1e-6)
    # Rotation leaves black corners, which the mean over pixels sees: flip_rotate is not the same.
    assert np.abs(probabilities(model, images, "flip_rotate") - plain).max() > 1e-5


def test_flip_is_the_mean_of_the_image_and_its_mirror_image(images):
    model = tiny_model(pooled=False)
    direct = np.asarray(model.predict_on_batch(images))
    mirrored = np.asarray(model.predict_on_batch(images[:, :, ::-1]))
    assert np.abs(direct - mirrored).max() > 1e-4  # this model does see the mirror
    np.testing.assert_allclose(probabilities(model, images, "flip", batch_size=8), (direct + mirrored) / 2, atol=1e-6)
    once, again = probabilities(model, images, "flip_rotate"), probabilities(model, images, "flip_rotate")
    np.testing.assert_array_equal(once, again)  # deterministic


def test_an_ensemble_of_two_copies_of_one_model_equals_that_model(images):
    model = tiny_model(pooled=False)
    np.testing.assert_allclose(probabilities(model, images, copies=2), probabilities(model, images), atol=1e-7)
    other = tiny_model(pooled=False, seed=1)
    members = [inference.keras_member(model), inference.keras_member(other)]
    each = inference.member_probabilities(members, inference.batches_of(images, 4), 4)
    assert each.shape == (2, len(images), len(CLASSES))
    np.testing.assert_allclose(each[0], probabilities(model, images), atol=1e-7)
    np.testing.assert_allclose(inference.ensemble_probabilities(members, inference.batches_of(images, 4), 4),
                               each.mean(axis=0))


def test_every_call_gets_a_full_batch_and_the_padding_is_dropped(images):
    shapes = []

    def predict(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return np.tile(batch.reshape(len(batch), -1).mean(axis=1, keepdims=True), (1, 2))

    member = inference.Member(predict, name="counting")
    result = inference.member_probabilities([member], inference.batches_of(images, 3), 3, "flip_rotate")
    assert result.shape == (1, len(images), 2)
    assert shapes == [(3, SIZE, SIZE, 1)] * 4 * 3  # 3 batches (3, 3, 1 + padding) of 4 views each
    with pytest.raises(ValueError, match="larger than batch_size=2"):
        inference.member_probabilities([member], [images[:3]], 2)


def test_a_members_temperature_scales_its_probabilities(images):
    model = tiny_model(pooled=False)
    member = inference.keras_member(model, temperature=2.5)
    scaled = inference.ensemble_probabilities([member], inference.batches_of(images, 4), 4)
    np.testing.assert_allclose(scaled, calibration.apply_temperature(probabilities(model, images), 2.5), atol=1e-6)


def test_views(images):
    white = np.full((2, SIZE, SIZE, 1), 255, np.uint8)
    plain, mirrored, left, right = inference.views(white, "flip_rotate")
    assert plain is white and (mirrored == white).all()
    for rotated in (left, right):
        assert rotated.dtype == np.uint8 and rotated.shape == white.shape
        assert rotated[0, 0, 0, 0] == 0 and rotated[0, SIZE // 2, SIZE // 2, 0] == 255  # black corners, same centre
    assert len(inference.views(images, "flip")) == 2 and len(inference.views(images, "none")) == 1
    with pytest.raises(ConfigError, match="^tta='mirror': not one of none, flip, flip_rotate"):
        inference.views(images, "mirror")
    with pytest.raises(ConfigError, match="^tta='mirror'"):
        inference.member_probabilities([inference.keras_member(tiny_model(True))], [images], 8, "mirror")


def test_members_must_agree_and_the_error_says_on_what():
    inference.check_compatible("run_dir", {"a": {"task": "four_class", "image_size": 32},
                                           "b": {"task": "four_class", "image_size": 32}})
    with pytest.raises(ConfigError, match=r"^run_dir='b': its image_size is 64 but a's is 32"):
        inference.check_compatible("run_dir", {"a": {"task": "four_class", "image_size": 32},
                                               "b": {"task": "four_class", "image_size": 64}})


def test_predictions_table_columns():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    table = inference.predictions_table(["a.png", "b.png"], probabilities, CLASSES, ["Normal", "Bacteria"],
                                        ["p1", "p2"], {"COVID-19": 0.5})
    assert list(table.columns) == ["file", "true_class", "predicted_class", "p_normal", "p_bacteria", "p_covid_19",
                                   "patient", "flag_covid_19"]
    assert table["predicted_class"].tolist() == ["Normal", "COVID-19"] and table["flag_covid_19"].tolist() == [0, 1]
    bare = inference.predictions_table(["a.png"], probabilities[:1], CLASSES)
    assert list(bare.columns) == ["file", "predicted_class", "p_normal", "p_bacteria", "p_covid_19"]
