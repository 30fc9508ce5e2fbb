"""Two augmented views of every image, for self-supervised pretraining: tf.data, stateless and seeded.

A view of a grey radiograph: gamma, contrast and brightness jitter, then one projective transform
that makes a random resized crop rotated by a small angle, then (with ``blur_prob``) a Gaussian
blur. No flips (a chest's left and right differ), no colour jitter (the images are grey). The
jitter, the crop and the resampling are ``xray_tf.augment``'s, as the strong training preset uses them;
only their strengths are set here.

Every random choice derives from ``(seed, epoch, step)``: epoch ``e``'s order of the images and
each batch's seed are drawn in NumPy from ``(seed, e)``, and the batch's two views fold 0 and 1
into its seed. Epoch ``e`` is therefore the same batches whenever it is built, and a resumed run
sees the views the uninterrupted run would have seen. Views stay uint8, as the project's
images do up to the model's first layer.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from xray_tf import augment
from xray_tf.decode import AUTOTUNE, without_autotune_thread
from xray_tf.image_cache import read_rows

BLUR_SIGMA = (0.1, 2.0)  # SimCLR's blur, in pixels of a 224 px image; scaled with the image size
_VIEW_STREAMS = (0, 1)  # folded into a batch's seed: one stream per view


@dataclasses.dataclass(frozen=True)
class ViewSettings:
    """What the views need; the field names of the crop's settings are ``pipeline.PipelineSettings``'."""

    image_size: int = 224
    batch_size: int = 64
    seed: int = 0
    crop_scale_min: float = 0.35  # a crop keeps at least this share of the area: enough lung to tell
    crop_aspect_max: float = 4 / 3
    rotation_degrees: float = 10.0
    blur_prob: float = 0.5


def gaussian_blur(images: tf.Tensor, sigmas: tf.Tensor) -> tf.Tensor:
    """Each image of a uint8 batch ``[B, S, S, 1]`` (B static) blurred with its own ``sigmas[b]`` (pixels).

    Separable: one depthwise convolution along rows and one along columns, with the batch moved
    into the channels so that every image gets its own kernel; edges are mirrored, not darkened.
    """
    batch, size = images.shape[0], images.shape[1]
    radius = max(1, min(size - 1, math.ceil(3 * BLUR_SIGMA[1] * size / 224)))
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernels = tf.exp(-tf.square(taps)[None, :] / (2.0 * tf.square(sigmas)[:, None]))
    kernels = tf.transpose(kernels / tf.reduce_sum(kernels, axis=1, keepdims=True))  # [K, B]
    pixels = tf.transpose(tf.cast(images, tf.float32), [3, 1, 2, 0])  # [1, S, S, B]
    pixels = tf.pad(pixels, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    pixels = tf.nn.depthwise_conv2d(pixels, tf.reshape(kernels, [2 * radius + 1, 1, batch, 1]), [1, 1, 1, 1], "VALID")
    pixels = tf.nn.depthwise_conv2d(pixels, tf.reshape(kernels, [1, 2 * radius + 1, batch, 1]), [1, 1, 1, 1], "VALID")
    return tf.cast(tf.round(tf.clip_by_value(tf.transpose(pixels, [3, 1, 2, 0]), 0.0, 255.0)), tf.uint8)


def view(images: tf.Tensor, seed: tf.Tensor, settings: ViewSettings) -> tf.Tensor:
    """One random view of each image of a uint8 batch ``[B, S, S, 1]`` (B static), from a stateless ``seed``."""
    seeds = tf.random.experimental.stateless_split(seed, 9)
    batch, size = images.shape[0], settings.image_size
    images = augment.photometric_jitter(images, seeds[:3])
    crop, offset = augment.random_crops(seeds[3:6], batch, settings)
    max_radians = settings.rotation_degrees * math.pi / 180.0
    angles = tf.random.stateless_uniform([batch], seeds[6], -max_radians, max_radians)
    transforms = augment.geometry_transforms(size, angles, crop, offset, tf.zeros([batch, 2]), tf.ones([batch]),
                                             tf.zeros([batch]))
    images = augment.apply_transforms(images, transforms, size)
    scale = size / 224
    sigmas = tf.random.stateless_uniform([batch], seeds[7], BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale)
    blurred = tf.random.stateless_uniform([batch], seeds[8]) < settings.blur_prob
    return tf.where(blurred[:, None, None, None], gaussian_blur(images, sigmas), images)


def two_views(images: tf.Tensor, seed: tf.Tensor, settings: ViewSettings) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch's two views, each from the batch's seed folded with a stream of its own."""
    first, second = (view(images, tf.random.experimental.stateless_fold_in(seed, stream), settings)
                     for stream in _VIEW_STREAMS)
    return first, second


def steps_per_epoch(image_count: int, batch_size: int) -> int:
    """Every image once an epoch, the last batch filled up with the epoch's first images: every batch is full."""
    return math.ceil(image_count / batch_size)


def epoch_views(images: np.ndarray, settings: ViewSettings, first: int, stop: int,
                rows: np.ndarray | None = None) -> tf.data.Dataset:
    """Epochs ``first`` to ``stop - 1`` (0-based) of ``((view, view),)`` batches of ``images`` (uint8 ``[N, S, S, 1]``).

    ``rows``: the rows of ``images`` to draw from (default: all). ``images`` may be a cache file's
    map: each batch is read from it by ``image_cache.read_rows`` through ``numpy_function``. An
    element is a 1-tuple so that ``fit`` takes both views as the model's input and no target.
    """
    if not 0 <= first < stop:
        raise ValueError(f"No epochs from {first} to {stop}.")
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    count, batch_size = len(rows), settings.batch_size
    if batch_size > count:
        raise ValueError(f"A batch of {batch_size} needs at least as many images; there are {count}.")
    steps = steps_per_epoch(count, batch_size)
    positions, seeds = [], []
    for epoch in range(first, stop):
        rng = np.random.default_rng(np.random.SeedSequence([settings.seed, epoch]))
        positions.append(np.resize(rng.permutation(count), steps * batch_size).reshape(steps, batch_size))
        seeds.append(rng.integers(0, np.iinfo(np.int64).max, size=(steps, 2)))
    size = settings.image_size

    def batch_views(batch: tf.Tensor, seed: tf.Tensor) -> tuple[tuple[tf.Tensor, tf.Tensor]]:
        pixels = tf.numpy_function(lambda drawn: read_rows(images, rows[drawn]), [batch], tf.uint8, stateful=False)
        return (two_views(tf.ensure_shape(pixels, [batch_size, size, size, 1]), seed, settings),)

    batches = tf.data.Dataset.from_tensor_slices((np.concatenate(positions), np.concatenate(seeds)))
    # Deterministic order: batch i of the output is always row i of the input.
    return without_autotune_thread(batches.map(batch_views, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE))
