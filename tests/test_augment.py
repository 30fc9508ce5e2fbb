"""Training augmentation: the paper's flips and rotation, the strong preset's one transform, MixUp and CutMix.

The pipeline's use of them (training batches only, determinism per seed and epoch) is in test_pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import small_settings

from xray_tf import augment, pipeline
from xray_tf.config import ConfigError


def _seed(number: int) -> tf.Tensor:
    return tf.constant([number, 7 * number + 1], tf.int64)


def _random_images(count: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, size, size, 1), dtype=np.uint8)


def _constant_batch(count: int, size: int = 16) -> tuple[tf.Tensor, tf.Tensor, np.ndarray]:
    """Images of one distinct grey level each, image i of class i: a pixel or a label says where it came from."""
    levels = np.arange(count) * (250 // count)
    images = np.broadcast_to(levels[:, None, None, None], (count, size, size, 1)).astype(np.uint8)
    return tf.constant(images), tf.one_hot(tf.range(count), count), levels


def _transform_point(transform: np.ndarray, x: float, y: float) -> tuple[float, float]:
    a0, a1, a2, b0, b1, b2, c0, c1 = transform
    k = c0 * x + c1 * y + 1.0
    return (a0 * x + a1 * y + a2) / k, (b0 * x + b1 * y + b2) / k


def test_flips_and_rotation_act_as_specified():
    image = np.zeros((1, 9, 9, 1), np.uint8)
    image[0, 1, 6, 0] = 200  # a bright pixel up and to the right
    batch = tf.constant(image)
    always_h = small_settings(image_size=9, flip_prob=1.0, rotation_prob=0.0)
    flipped = augment.augment_batch(batch, _seed(1), always_h).numpy()
    assert np.array_equal(flipped, image[:, ::-1, ::-1])  # both flips fire at p=1
    quarter_turn = tf.constant([math.pi / 2])
    transform = augment.rotation_transforms(quarter_turn, 9, 9)
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=batch, transforms=transform, output_shape=[9, 9], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT").numpy()
    # A positive angle turns the picture counter-clockwise as displayed (rows down, columns right);
    # cos(pi/2) is not exactly 0 in float32, hence one grey level of tolerance.
    expected = np.rot90(image[0, :, :, 0], k=1).astype(int)
    assert np.abs(rotated[0, :, :, 0].astype(int) - expected).max() <= 1


def test_rotation_probability_and_range():
    settings = small_settings(image_size=15, flip_prob=0.0, rotation_prob=0.3, rotation_degrees=15)
    image = np.zeros((400, 15, 15, 1), np.uint8)
    image[:, 7, 2:13] = 255  # a horizontal bar through the centre
    out = augment.augment_batch(tf.constant(image), tf.constant([5, 0], tf.int64), settings).numpy()
    rotated = np.array([not np.array_equal(o, i) for o, i in zip(out, image)])
    assert 0.22 < rotated.mean() < 0.38  # 400 draws of p=0.3: sd 0.023
    # At most 15 degrees, the bar's ends move by at most 5 * sin(15 deg) ~ 1.3 px: rows 5..9 only.
    assert not out[rotated][:, :5].any() and not out[rotated][:, 10:].any()


def test_paper_flips_come_from_the_seeds_own_stream():
    """The paper preset's flips are drawn from stateless_split(seed, 4)[0] and [1], as ever: a change
    there would change every run's batches, and a resumed old run's."""
    images = _random_images(32)
    seed = _seed(3)
    out = augment.augment_batch(tf.constant(images), seed, small_settings(rotation_prob=0.0)).numpy()
    assert np.array_equal(out, augment.augment_batch(tf.constant(images), seed,
                                                     small_settings(augment="paper", rotation_prob=0.0)).numpy())
    flip_h_seed, flip_v_seed = tf.random.experimental.stateless_split(seed, 4)[:2]
    flip_h = (tf.random.stateless_uniform([32], flip_h_seed) < 0.5).numpy()
    flip_v = (tf.random.stateless_uniform([32], flip_v_seed) < 0.5).numpy()
    assert 0 < flip_h.sum() < 32 and 0 < flip_v.sum() < 32
    for image, result, h, v in zip(images, out, flip_h, flip_v):
        assert np.array_equal(result, image[::-1 if v else 1, ::-1 if h else 1])


def test_strong_is_seeded_uint8_and_stronger_than_paper():
    images = tf.constant(_random_images(8))
    strong = small_settings(augment="strong")
    first, again, other = (augment.augment_batch(images, _seed(s), strong) for s in (1, 1, 2))
    assert first.dtype == tf.uint8 and first.shape == (8, 32, 32, 1)
    assert np.array_equal(first.numpy(), again.numpy())
    assert not np.array_equal(first.numpy(), other.numpy())
    paper = augment.augment_batch(images, _seed(1), small_settings()).numpy()
    # Every image is cropped and jittered, not only the rotated third.
    assert all(not np.array_equal(s, p) for s, p in zip(first.numpy(), paper))


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="augment"):
        augment.augment_batch(tf.constant(_random_images(2)), _seed(0), small_settings(augment="wild"))


def test_one_transform_composes_crop_shift_zoom_shear_and_rotation():
    def transforms(angles=0.0, crop=(32.0, 32.0), offset=(0.0, 0.0), shift=(0.0, 0.0), zoom=1.0, shear=0.0):
        return augment.geometry_transforms(32, tf.constant([angles]), tf.constant([crop]), tf.constant([offset]),
                                           tf.constant([shift]), tf.constant([zoom]), tf.constant([shear]))[0].numpy()

    # A whole-image crop and nothing else: the identity, and the image comes back as it was.
    assert np.allclose(transforms(), [1, 0, 0, 0, 1, 0, 0, 0])
    images = _random_images(1)
    same = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(images), transforms=tf.constant([transforms()]), output_shape=[32, 32],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT").numpy()
    assert np.array_equal(same, images)
    # A rotation alone is the paper's rotation.
    assert np.allclose(transforms(angles=0.2), augment.rotation_transforms(tf.constant([0.2]), 32, 32)[0], atol=1e-5)
    # A crop 16 wide, 8 high, centred at (15.5 + 3, 15.5 - 2): the output's edges (-0.5, 31.5) land on its edges.
    crop = transforms(crop=(16.0, 8.0), offset=(3.0, -2.0))
    assert np.allclose(_transform_point(crop, -0.5, -0.5), (10.5, 9.5))
    assert np.allclose(_transform_point(crop, 31.5, 31.5), (26.5, 17.5))
    # Shifted by (2, 1), pixel p shows what was at p - (2, 1); zoom 0.5 halves distances to the centre.
    assert np.allclose(_transform_point(transforms(shift=(2.0, 1.0)), 10.0, 10.0), (8.0, 9.0))
    assert np.allclose(_transform_point(transforms(zoom=0.5), 31.5, 15.5), (23.5, 15.5))
    assert np.allclose(_transform_point(transforms(shear=0.25), 15.5, 19.5), (16.5, 19.5))


@pytest.mark.parametrize("scale_min, aspect_max", [(0.6, 4 / 3), (0.9, 2.0)])
def test_random_crops_keep_their_area_and_aspect_ranges_inside_the_image(scale_min, aspect_max):
    settings = small_settings(crop_scale_min=scale_min, crop_aspect_max=aspect_max)
    seeds = tf.random.experimental.stateless_split(_seed(4), 3)
    crop, offset = (t.numpy() for t in augment.random_crops(seeds, 2000, settings))
    area, aspect = crop.prod(axis=1) / 32 ** 2, crop[:, 0] / crop[:, 1]
    assert area.min() >= scale_min - 1e-5 and area.max() <= 1 + 1e-5
    assert area.min() < scale_min + 0.01 and area.max() > 0.99  # the whole range is used
    assert aspect.min() >= 1 / aspect_max - 1e-4 and aspect.max() <= aspect_max + 1e-4
    assert np.all(np.abs(offset) + crop / 2 <= 16 + 1e-4)  # inside the image


def test_beta_draws_have_the_beta_mean_and_variance():
    for alpha in (0.4, 2.0):
        sample = tf.function(lambda seed: augment.beta_sample(seed, alpha))  # one trace, 400 quick calls
        draws = np.array([sample(_seed(s)).numpy() for s in range(400)])
        assert np.all((draws >= 0) & (draws <= 1))
        # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 400 draws, sd of the mean <= 0.025.
        assert abs(draws.mean() - 0.5) < 0.08 and abs(draws.var() - 1 / (4 * (2 * alpha + 1))) < 0.03, alpha


def test_mixup_blends_images_and_labels_by_one_weight():
    images, labels, levels = _constant_batch(6)
    settings = small_settings(image_size=16, mixup_alpha=0.4)
    blended = 0
    for number in range(6):
        mixed, mixed_labels = (t.numpy() for t in augment.mix_batch(images, labels, _seed(number), settings))
        assert mixed.dtype == np.uint8 and mixed.shape == images.shape
        assert np.allclose(mixed_labels.sum(axis=1), 1)
        own = mixed_labels.diagonal()  # lambda, or 1 for an image paired with itself
        others = mixed_labels - np.diag(own)
        partners = np.where(own < 1, others.argmax(axis=1), np.arange(6))
        assert np.allclose(own[partners != np.arange(6)], own.min())  # one lambda a batch
        # Label and image: lambda * own + (1 - lambda) * the partner's, with the same lambda.
        assert np.allclose(others.max(axis=1), 1 - own)
        expected = np.round(own * levels + (1 - own) * levels[partners])
        assert np.array_equal(mixed[:, 0, 0, 0], expected) and np.all(mixed == mixed[:, :1, :1]), number
        blended += 0.05 < own.min() < 0.95
    assert blended  # some weight strictly between


def test_cutmix_weighs_labels_by_the_pasted_area():
    images, labels, levels = _constant_batch(6)
    settings = small_settings(image_size=16, cutmix_alpha=1.0)
    pasted_any = False
    for number in range(6):
        mixed, mixed_labels = (t.numpy() for t in augment.mix_batch(images, labels, _seed(number), settings))
        assert np.allclose(mixed_labels.sum(axis=1), 1)
        for i in range(6):
            foreign = mixed[i, :, :, 0] != levels[i]
            if foreign.any():
                partner = np.flatnonzero(levels == mixed[i][foreign][0])[0]
                assert np.all(mixed[i][foreign] == levels[partner])
                rows, columns = np.flatnonzero(foreign.any(axis=1)), np.flatnonzero(foreign.any(axis=0))
                assert foreign.sum() == len(rows) * len(columns)  # one box
                assert np.isclose(mixed_labels[i, partner], foreign.mean())
                assert np.isclose(mixed_labels[i, i], 1 - foreign.mean())
                pasted_any = True
    assert pasted_any


def test_with_both_each_batch_gets_mixup_or_cutmix():
    images, labels, levels = _constant_batch(8)
    settings = small_settings(image_size=16, mixup_alpha=1.0, cutmix_alpha=1.0)
    kinds = set()
    for number in range(12):
        mixed, _ = augment.mix_batch(images, labels, _seed(number), settings)
        new_levels = not np.isin(mixed.numpy(), levels).all()  # MixUp makes grey levels that were not there
        kinds.add("mixup" if new_levels else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_no_alpha_no_mixing():
    images, labels, _ = _constant_batch(4)
    mixed, mixed_labels = augment.mix_batch(images, labels, _seed(0), small_settings(image_size=16))
    assert mixed is images and mixed_labels is labels


def test_mixing_leaves_the_flips_and_rotations_alone(index):
    """MixUp's draws are folded off the batch seed: with alpha tiny (weights 0 or 1) each batch is
    the plain batch itself or in another order, so the flips and rotations were the same."""
    plain, mixed = (pipeline.build_datasets(index.frame, 4, small_settings(mixup_alpha=alpha)).epochs(0, 1)
                    for alpha in (0.0, 1e-3))
    reordered = 0
    for (images, _), (mixed_images, mixed_labels) in zip(plain.as_numpy_iterator(), mixed.as_numpy_iterator()):
        assert sorted(image.tobytes() for image in images) == sorted(image.tobytes() for image in mixed_images)
        assert set(mixed_labels.ravel()) <= {0.0, 1.0}
        reordered += not np.array_equal(images, mixed_images)
    assert reordered  # some batches did take the partner's images
