"""Training augmentation of uint8 batches in tf.data: stateless, seeded per batch.

``augment_batch`` applies the preset that ``settings.augment`` names:

* ``paper``: random horizontal and vertical flips and a random rotation (the paper's recipe);
* ``strong``: the same flips and rotation (the same random decisions), plus per image a random
  resized crop, a small translation, scale and shear, all sampled through ONE projective
  transform (one resampling, one op for the batch), and brightness, contrast and gamma jitter.

``mix_batch`` then blends a batch with itself in another order, labels too: MixUp (a weighted
mean of two images) or CutMix (a box pasted from the partner image).

Every random draw derives from the batch's seed. The flips and rotation use the seed's own
stream (``stateless_split(seed, 4)``); everything else folds a constant of its own into the seed
first, so adding the strong preset or mixing never changes which flips and rotations happen.
Images stay uint8 between the steps: float only inside a step, rounded and clipped back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import tensorflow as tf

from xray_tf.config import AUGMENTATIONS, ConfigError

if TYPE_CHECKING:  # a type only: pipeline imports this module
    from xray_tf.pipeline import PipelineSettings

# Small constants of the strong preset, not flags: the crop (crop_scale_min, crop_aspect_max) is
# the strong transform; these add variety while a radiograph stays a plausible radiograph.
SHIFT_SHARE = 0.05  # translation up to 5 % of the size each way: positioning varies by a few percent
ZOOM_MAX = 1.1  # scale log-uniform in [1/1.1, 1.1]: patients' distance to the detector varies a little
SHEAR_MAX = math.tan(math.radians(5.0))  # up to 5 degrees: a slightly oblique beam
BRIGHTNESS = 0.1  # added, in [-0.1, 0.1] of the full range: exposure varies between machines
CONTRAST = 0.1  # factor in [0.9, 1.1] about the image's mean: so does the dynamic range
GAMMA_MAX = 1.2  # exponent log-uniform in [1/1.2, 1.2]: and the detector's response curve

# Constants folded into a batch's seed, one per stream that must leave the flips' stream alone.
_STRONG_STREAM = 1
_MIX_STREAM = 2


def rotation_transforms(angles: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Projective transforms ``[B, 8]`` rotating each image by ``angles`` (radians) about its centre.

    A transform maps an output pixel (x, y) to the input location it samples from:
    ``R (p - c) + c`` with c the image centre.
    """
    cos, sin = tf.cos(angles), tf.sin(angles)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    zeros = tf.zeros_like(angles)
    return tf.stack(
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros], axis=1
    )


def geometry_transforms(size: int, angles: tf.Tensor, crop: tf.Tensor, offset: tf.Tensor, shift: tf.Tensor,
                        zoom: tf.Tensor, shear: tf.Tensor) -> tf.Tensor:
    """Projective transforms ``[B, 8]`` of ``size`` x ``size`` images: crop, shift, zoom, shear and rotate in one.

    ``crop`` ``[B, 2]``: the (width, height) in pixels of the input box resized to the whole output;
    ``offset`` ``[B, 2]``: that box's centre minus the image centre; ``shift`` ``[B, 2]``: how far
    the content moves in the output, in pixels; ``zoom`` ``[B]``: the sampling step (below 1
    magnifies); ``shear`` ``[B]``: x sampled from ``x + shear * y``; ``angles`` ``[B]``: as
    ``rotation_transforms``. An output pixel p samples the input at
    ``c + offset + C Sh Z R (p - c - shift)``, C = diag(crop / size), c the image centre; with
    a whole-image crop and nothing else it is exactly ``rotation_transforms``.
    """
    cos, sin = tf.cos(angles), tf.sin(angles)
    sx, sy = crop[:, 0] / size * zoom, crop[:, 1] / size * zoom
    # C Sh Z R, row by row: [[sx, sx*shear], [0, sy]] @ [[cos, -sin], [sin, cos]].
    a00, a01 = sx * (cos + shear * sin), sx * (shear * cos - sin)
    a10, a11 = sy * sin, sy * cos
    centre = (size - 1) / 2.0
    px, py = centre + shift[:, 0], centre + shift[:, 1]
    zeros = tf.zeros_like(angles)
    return tf.stack([a00, a01, centre + offset[:, 0] - a00 * px - a01 * py,
                     a10, a11, centre + offset[:, 1] - a10 * px - a11 * py, zeros, zeros], axis=1)


def apply_transforms(images: tf.Tensor, transforms: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resampling with black outside the input, as the paper's rotation does."""
    return tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms, output_shape=[size, size],
                                                 fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def _uniform(seed: tf.Tensor, shape: list, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, low, high)


def random_crops(seeds: tf.Tensor, batch: tf.Tensor, settings: PipelineSettings) -> tuple[tf.Tensor, tf.Tensor]:
    """(width, height) and centre offset ``[B, 2]`` of random crops inside the image: area share
    uniform in ``[crop_scale_min, 1]``, aspect ratio log-uniform in ``[1/crop_aspect_max,
    crop_aspect_max]`` narrowed to the ratios whose sides fit at that area (so no side is clipped,
    which would shrink the area below the range)."""
    area_seed, aspect_seed, place_seed = tf.unstack(seeds)
    size = float(settings.image_size)
    area = _uniform(area_seed, [batch], settings.crop_scale_min, 1.0)
    log_aspect = tf.minimum(math.log(settings.crop_aspect_max), -tf.math.log(area)) * _uniform(
        aspect_seed, [batch], -1.0, 1.0)
    sides = tf.sqrt(tf.stack([area * tf.exp(log_aspect), area * tf.exp(-log_aspect)], axis=1))
    crop = tf.minimum(size * sides, size)  # only float rounding can exceed the image
    return crop, (size - crop) / 2.0 * _uniform(place_seed, [batch, 2], -1.0, 1.0)


def photometric_jitter(images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """Per image gamma, then contrast about the image's mean, then brightness; back to uint8."""
    gamma_seed, contrast_seed, brightness_seed = tf.unstack(seeds)
    batch = tf.shape(images)[0]
    log_gamma = math.log(GAMMA_MAX)
    gamma = tf.exp(_uniform(gamma_seed, [batch, 1, 1, 1], -log_gamma, log_gamma))
    contrast = _uniform(contrast_seed, [batch, 1, 1, 1], 1.0 - CONTRAST, 1.0 + CONTRAST)
    brightness = _uniform(brightness_seed, [batch, 1, 1, 1], -BRIGHTNESS, BRIGHTNESS)
    pixels = tf.pow(tf.cast(images, tf.float32) / 255.0, gamma)
    mean = tf.reduce_mean(pixels, axis=[1, 2, 3], keepdims=True)
    pixels = (pixels - mean) * contrast + mean + brightness
    return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 1.0) * 255.0), tf.uint8)


def check_preset(settings: PipelineSettings) -> None:
    """Raise ConfigError unless ``settings.augment`` names a preset; the pipeline calls it when it is
    built, since an error raised while tf.data traces ``augment_batch`` comes out as another type."""
    if settings.augment not in AUGMENTATIONS:
        raise ConfigError("augment", settings.augment, f"not one of {', '.join(AUGMENTATIONS)}.")


def augment_batch(images: tf.Tensor, seed: tf.Tensor, settings: PipelineSettings) -> tf.Tensor:
    """The ``settings.augment`` preset applied to a uint8 batch ``[B, S, S, 1]``, from a stateless ``seed``."""
    check_preset(settings)
    batch = tf.shape(images)[0]
    flip_h_seed, flip_v_seed, rotate_seed, angle_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )

    def chosen(probability: float, op_seed: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], op_seed) < probability

    # Flips work on [B, H, W]: reversing a trailing axis of size 1 is several times slower in TF.
    # Horizontal: only the chosen images are reversed. Vertical: one gather of whole rows, in
    # reverse order for the chosen images, instead of a reversed copy of the batch and a select.
    grey = images[..., 0]
    flip_h = tf.where(chosen(settings.flip_prob, flip_h_seed))
    grey = tf.tensor_scatter_nd_update(grey, flip_h, tf.reverse(tf.gather_nd(grey, flip_h), axis=[2]))
    height = tf.shape(grey)[1]
    row_order = tf.where(chosen(settings.flip_prob, flip_v_seed)[:, None], tf.range(height - 1, -1, -1),
                         tf.range(height))
    images = tf.gather(grey, row_order, axis=1, batch_dims=1)[..., None]

    max_radians = settings.rotation_degrees * math.pi / 180.0
    angles = tf.random.stateless_uniform([batch], angle_seed, -max_radians, max_radians)
    rotate = chosen(settings.rotation_prob, rotate_seed)
    size = settings.image_size
    if settings.augment == "strong":
        return _strong(images, tf.random.experimental.stateless_fold_in(seed, _STRONG_STREAM),
                       tf.where(rotate, angles, 0.0), settings)

    # Only the images chosen for rotation are transformed: at p = 0.3 that is a third of the work of
    # transforming the whole batch with angle 0 for the others.
    rotated = tf.where(rotate)
    turned = apply_transforms(tf.gather_nd(images, rotated),
                          rotation_transforms(tf.gather_nd(angles, rotated), size, size), size)
    return tf.tensor_scatter_nd_update(images, rotated, turned)


def _strong(images: tf.Tensor, seed: tf.Tensor, angles: tf.Tensor, settings: PipelineSettings) -> tf.Tensor:
    """The strong preset after the flips: jitter first, so the black outside the input stays black."""
    seeds = tf.random.experimental.stateless_split(seed, 9)
    batch = tf.shape(images)[0]
    images = photometric_jitter(images, seeds[:3])
    crop, offset = random_crops(seeds[3:6], batch, settings)
    size = settings.image_size
    shift = _uniform(seeds[6], [batch, 2], -SHIFT_SHARE * size, SHIFT_SHARE * size)
    zoom = tf.exp(_uniform(seeds[7], [batch], -math.log(ZOOM_MAX), math.log(ZOOM_MAX)))
    shear = _uniform(seeds[8], [batch], -SHEAR_MAX, SHEAR_MAX)
    return apply_transforms(images, geometry_transforms(size, angles, crop, offset, shift, zoom, shear), size)


def beta_sample(seed: tf.Tensor, alpha: float) -> tf.Tensor:
    """One float32 draw of Beta(alpha, alpha), stateless: ``sigmoid(log X - log Y)`` for X, Y ~ Gamma(alpha).

    Each log-gamma is ``log G + log(U) / alpha`` with G ~ Gamma(alpha + 1), U ~ U(0, 1) (the
    same distribution): a small alpha's gammas underflow to 0, their logs do not, so the draws
    still crowd at 0 and 1 as they should instead of becoming 0 / 0.
    """
    gamma_seed, uniform_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    gammas = tf.random.stateless_gamma([2], gamma_seed, alpha + 1.0, dtype=tf.float64)
    uniforms = tf.random.stateless_uniform([2], uniform_seed, dtype=tf.float64)
    logs = tf.math.log(gammas) + tf.math.log(uniforms) / alpha
    return tf.cast(tf.sigmoid(logs[0] - logs[1]), tf.float32)


def _mixup(images: tf.Tensor, labels: tf.Tensor, partner: tf.Tensor, share: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``share * own + (1 - share) * partner``, images rounded back to uint8."""
    pixels = share * tf.cast(images, tf.float32) + (1.0 - share) * tf.cast(tf.gather(images, partner), tf.float32)
    return tf.cast(tf.round(pixels), tf.uint8), share * labels + (1.0 - share) * tf.gather(labels, partner)


def _cutmix(images: tf.Tensor, labels: tf.Tensor, partner: tf.Tensor, share: tf.Tensor,
            centre_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A square box of area share ``1 - share``, centred anywhere and clipped to the image, pasted
    from the partner; labels mixed by the box's clipped area."""
    size = tf.shape(images)[1]
    side = tf.cast(size, tf.float32) * tf.sqrt(1.0 - share)
    centre = _uniform(centre_seed, [2], 0.0, 1.0) * tf.cast(size, tf.float32)
    low = tf.clip_by_value(tf.cast(tf.round(centre - side / 2.0), tf.int32), 0, size)
    high = tf.clip_by_value(tf.cast(tf.round(centre + side / 2.0), tf.int32), 0, size)
    positions = tf.range(size)
    rows = (positions >= low[0]) & (positions < high[0])
    columns = (positions >= low[1]) & (positions < high[1])
    box = (rows[:, None] & columns[None, :])[None, :, :, None]
    pasted = tf.reduce_prod(tf.cast(high - low, tf.float32)) / tf.cast(size * size, tf.float32)
    mixed = tf.where(box, tf.gather(images, partner), images)
    return mixed, (1.0 - pasted) * labels + pasted * tf.gather(labels, partner)


def mix_batch(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor,
              settings: PipelineSettings) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp or CutMix of a uint8 batch and its float labels with the batch in another (seeded) order.

    One weight a batch, ``lambda ~ Beta(alpha, alpha)``: MixUp keeps ``lambda`` of each image and
    label; CutMix pastes a box of area share ``1 - lambda``. With both alphas positive a seeded coin
    picks one of the two for the batch; with neither the batch is returned as it is. The draws come
    from ``seed`` folded with a constant of their own, so the flips and rotations stay the same.
    """
    mixup, cutmix = settings.mixup_alpha > 0, settings.cutmix_alpha > 0
    if not (mixup or cutmix):
        return images, labels
    order_seed, mixup_seed, cutmix_seed, centre_seed, coin_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, _MIX_STREAM), 5)
    )
    partner = tf.argsort(tf.random.stateless_uniform([tf.shape(images)[0]], order_seed))

    def mixed_up() -> tuple[tf.Tensor, tf.Tensor]:
        return _mixup(images, labels, partner, beta_sample(mixup_seed, settings.mixup_alpha))

    def cut_mixed() -> tuple[tf.Tensor, tf.Tensor]:
        return _cutmix(images, labels, partner, beta_sample(cutmix_seed, settings.cutmix_alpha), centre_seed)

    if not cutmix:
        return mixed_up()
    if not mixup:
        return cut_mixed()
    return tf.cond(tf.random.stateless_uniform([], coin_seed) < 0.5, mixed_up, cut_mixed)
