"""The pretraining views: seeded and stateless, uint8, and different where they should be."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from xray_tf import ssl_views

SETTINGS = ssl_views.ViewSettings(image_size=32, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Ten smooth grey images: a gradient with a bright disc, as a radiograph has structure to crop."""
    yy, xx = np.mgrid[:32, :32]
    rng = np.random.default_rng(0)
    frames = [np.clip(4 * xx + 60 * (np.hypot(yy - rng.integers(8, 24), xx - rng.integers(8, 24)) < 6), 0, 255)
              for _ in range(10)]
    return np.stack(frames).astype(np.uint8)[..., None]


def _epochs(images: np.ndarray, first: int, stop: int, settings: ssl_views.ViewSettings = SETTINGS) -> list:
    return [tuple(view.numpy() for view in views) for (views,) in ssl_views.epoch_views(images, settings, first, stop)]


def test_views_are_uint8_batches_of_the_image_size(images):
    batches = _epochs(images, 0, 1)
    assert len(batches) == ssl_views.steps_per_epoch(10, 4) == 3  # the last batch filled up: every batch full
    for first, second in batches:
        assert first.dtype == second.dtype == np.uint8
        assert first.shape == second.shape == (4, 32, 32, 1)
        assert not np.array_equal(first, second)  # two views of the same images differ


def test_same_seed_same_views_and_a_resumed_epoch_is_the_same(images):
    both = _epochs(images, 0, 2)
    again = _epochs(images, 0, 2)
    resumed = _epochs(images, 1, 2)  # a run resumed after epoch 1
    for a, b in zip(both, again):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for a, b in zip(both[3:], resumed):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_another_epoch_or_seed_gives_other_views(images):
    epoch_0, epoch_1 = _epochs(images, 0, 1), _epochs(images, 1, 2)
    other_seed = _epochs(images, 0, 1, ssl_views.ViewSettings(image_size=32, batch_size=4, seed=4))
    assert not np.array_equal(epoch_0[0][0], epoch_1[0][0])
    assert not np.array_equal(epoch_0[0][0], other_seed[0][0])


def test_a_view_keeps_the_images_range_and_content(images):
    batch = tf.constant(images[:4])
    view = ssl_views.view(batch, tf.constant([1, 2], tf.int64), SETTINGS).numpy()
    assert view.max() <= 255 and view.min() >= 0 and view.max() > 100  # still an image, not black
    # A view is a transformed image, not noise: it correlates with its source more than with another image.
    own = np.corrcoef(view[0].ravel(), images[0].ravel())[0, 1]
    assert own > 0.5


def test_gaussian_blur_keeps_the_mean_and_smooths():
    rng = np.random.default_rng(1)
    noise = tf.constant(rng.integers(0, 256, (2, 32, 32, 1)), tf.uint8)
    blurred = ssl_views.gaussian_blur(noise, tf.constant([2.0, 0.1])).numpy().astype(float)
    original = noise.numpy().astype(float)
    assert blurred[0].std() < 0.5 * original[0].std()  # sigma 2 smooths noise a lot
    assert np.abs(blurred[1] - original[1]).max() <= 1  # sigma 0.1 is the identity, up to rounding
    assert blurred[0].mean() == pytest.approx(original[0].mean(), abs=3)


def test_views_are_drawn_from_the_rows_given(images):
    rows = [0, 3, 4, 7, 9]  # e.g. the images left after skipping unreadable files
    batches = list(ssl_views.epoch_views(images, SETTINGS, 0, 1, rows))
    assert len(batches) == ssl_views.steps_per_epoch(len(rows), 4) == 2
    with pytest.raises(ValueError, match="A batch of 4 needs at least as many images; there are 2"):
        ssl_views.epoch_views(images, SETTINGS, 0, 1, [1, 2])
