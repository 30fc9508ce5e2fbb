"""tf.data input pipeline: decode once, cache uint8, then sample, augment and batch every epoch.

Order of work, chosen so that the expensive part happens once:

1. read + decode (JPEG, PNG, BMP, GIF (first frame) or WebP of any size; grey, RGB, RGBA or CMYK;
   8 or 16 bit) to one grey uint8 channel, resize to ``image_size`` (bilinear with antialiasing),
   all in parallel;
2. cache the resized uint8 images (in memory or in files), one cache per class when sampling is
   class-balanced so each class can be drawn from independently;
3. per epoch: shuffle, class-balanced sampling, batch, then augment whole batches (flips,
   rotation) with stateless random ops seeded from the pipeline seed, prefetch.

Augmentation runs after batching, vectorised, and is seeded per batch, so two pipelines built
with the same seed yield identical batches whatever the parallelism. Every random choice of
epoch ``e`` derives from ``(seed, e)`` alone, so a run resumed at epoch ``e`` sees exactly the
batches the uninterrupted run would have seen.

``find_unreadable`` decodes a list of files once before training and says, per file, why it
cannot be used, so a bad file stops a run before it starts rather than in the middle of an epoch.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """What the input pipeline needs to know; the trainer's config fills it from the flags."""

    image_size: int = 224
    batch_size: int = 32
    cache: str = "memory"  # "memory", "none", or a directory for cache files
    sampler: str = "balanced"  # "balanced" or "none"
    flip_prob: float = 0.5
    rotation_prob: float = 0.3
    rotation_degrees: float = 15.0
    seed: int = 0


def _luma(rgb: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` (as libjpeg and PIL) of float ``[..., 3]``.

    Written as ``R + 0.587 (G - R) + 0.114 (B - R)``, which is exactly R when the channels are
    equal, so an X-ray saved as RGB gives the very pixels of its grey original.
    """
    red = rgb[..., :1]
    return red + tf.reduce_sum((rgb[..., 1:] - red) * (0.587, 0.114), axis=-1, keepdims=True)


def decode_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one image file and return it as ``uint8 [image_size, image_size, 1]``.

    Files are decoded with their own channels, since TensorFlow's grey conversion (``channels=1``)
    fails on GIF, BMP, WebP and CMYK JPEG. Colour (RGB, RGBA, CMYK) is resized in colour, alpha
    dropped, and then turned grey: resizing first keeps a huge colour image's memory small.
    ``dtype=uint8`` rescales 16-bit PNGs; the resize squashes to a square like the Kaggle copies.
    """
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=0, dtype=tf.uint8, expand_animations=False)
    colour = tf.shape(image)[-1] >= 3  # else grey, or grey + alpha
    image = tf.cond(colour, lambda: image[..., :3], lambda: image[..., :1])
    image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    image = tf.cond(colour, lambda: _luma(image), lambda: image)
    return tf.saturate_cast(tf.round(image), tf.uint8)


_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, last in every complete PNG


# Formats told apart by their first bytes, to say what a file that does not decode actually is.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (_PNG_START, "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
UNSUPPORTED_FORMATS = ("TIFF", "DICOM", "JPEG 2000")
_SUPPORTED = "JPEG, PNG, BMP, GIF or WebP"


def sniff_format(head: bytes) -> str | None:
    """The image format that the first 132 bytes of a file announce, or None if none is known."""
    if head[128:132] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def decode_error_message(error: tf.errors.OpError) -> str:
    """TensorFlow's message without the op plumbing around it, e.g. 'Input is empty.'"""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.DOTALL).replace("\n", " ").strip()


def _why_unreadable(path: str, image_size: int) -> str | None:
    """Why ``decode_image`` fails on ``path``, in words naming the format; None if it decodes now."""
    try:
        decode_image(tf.constant(path), image_size)
        return None
    except tf.errors.OpError as error:
        message = decode_error_message(error)
    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            content = handle.read()
    except (tf.errors.OpError, OSError):
        return f"cannot be read: {message}"
    if not content:
        return "empty file (0 bytes)"
    found = sniff_format(content[:132])
    if found in UNSUPPORTED_FORMATS:
        return f"{found} image: not supported, convert it to {_SUPPORTED}"
    if found == "PNG" and not content.endswith(_PNG_END):
        return "PNG file that ends early (truncated?): no IEND chunk at its end"
    if found:
        return f"{found} file that does not decode (corrupt or truncated?): {message}"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(content[:132])  # a character may be cut
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"not an image but text starting {text[:40]!r}"
    return f"not an image ({message})"


def find_unreadable(paths: Sequence[str], image_size: int, log_every_s: float = 10.0) -> dict[str, str]:
    """Decode every file once, as training will; return ``{path: reason}`` for those that fail.

    One parallel tf.data pass decodes everything, dropping failures with ``ignore_errors``; only
    the files it dropped are decoded again, one by one, to say why. Progress is logged every
    ``log_every_s`` seconds, since a large dataset takes minutes.
    """
    paths = list(paths)
    if not paths:
        return {}

    decoded = (
        tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=str))
        .enumerate()
        # The image is returned, not just dropped: an unused decode would be optimised away.
        .map(lambda index, path: (index, decode_image(path, image_size)), num_parallel_calls=AUTOTUNE,
             deterministic=False)
        .ignore_errors()
        .batch(256)
        .prefetch(2)
    )
    readable = np.zeros(len(paths), dtype=bool)
    start = last_log = time.perf_counter()
    for indices, _ in decoded:
        readable[indices.numpy()] = True
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            logger.info("checked %d of %d images (%.0f images/s)", readable.sum(), len(paths),
                        readable.sum() / (now - start))
            last_log = now
    reasons = {paths[i]: _why_unreadable(paths[i], image_size) for i in np.flatnonzero(~readable)}
    unreadable = {path: reason for path, reason in reasons.items() if reason is not None}
    logger.info("checked %d images in %.1f s: %d cannot be decoded", len(paths), time.perf_counter() - start,
                len(unreadable))
    return unreadable


def _cache(dataset: tf.data.Dataset, cache: str, name: str) -> tf.data.Dataset:
    if cache == "none":
        return dataset
    if cache == "memory":
        return dataset.cache()
    os.makedirs(cache, exist_ok=True)
    return dataset.cache(os.path.join(cache, name))


def _cache_name(frame: pd.DataFrame, tag: str, image_size: int) -> str:
    """A file-cache name that changes whenever the files, labels or size change."""
    digest = hashlib.sha1()
    for path, label in zip(frame["path"], frame["label_index"]):
        digest.update(f"{path}\t{label}\n".encode())
    return f"{tag}_{image_size}px_{digest.hexdigest()[:12]}"


def decoded_dataset(frame: pd.DataFrame, image_size: int, cache: str, tag: str) -> tf.data.Dataset:
    """``(uint8 image, int64 label_index)`` for each row of ``frame``, in row order, cached."""
    paths = tf.data.Dataset.from_tensor_slices(
        (frame["path"].to_numpy(dtype=str), frame["label_index"].to_numpy(dtype=np.int64))
    )
    images = paths.map(
        lambda path, label: (decode_image(path, image_size), label), num_parallel_calls=AUTOTUNE
    )
    return _cache(images, cache, _cache_name(frame, tag, image_size))


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


def augment_batch(images: tf.Tensor, seed: tf.Tensor, settings: PipelineSettings) -> tf.Tensor:
    """Random horizontal/vertical flips and rotation of a uint8 batch, from a stateless ``seed``."""
    batch = tf.shape(images)[0]
    flip_h_seed, flip_v_seed, rotate_seed, angle_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )

    def chosen(probability: float, op_seed: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], op_seed) < probability

    flip_h = chosen(settings.flip_prob, flip_h_seed)[:, None, None, None]
    images = tf.where(flip_h, tf.reverse(images, axis=[2]), images)
    flip_v = chosen(settings.flip_prob, flip_v_seed)[:, None, None, None]
    images = tf.where(flip_v, tf.reverse(images, axis=[1]), images)

    max_radians = settings.rotation_degrees * math.pi / 180.0
    angles = tf.random.stateless_uniform([batch], angle_seed, -max_radians, max_radians)
    angles *= tf.cast(chosen(settings.rotation_prob, rotate_seed), tf.float32)
    size = settings.image_size
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=rotation_transforms(angles, size, size),
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


@dataclasses.dataclass
class Datasets:
    """The batched datasets for fit and evaluation, plus the caches to fill before training."""

    train: tf.data.Dataset  # augmented, sampled, one epoch per iteration (a new draw each time)
    evaluation: dict[str, tf.data.Dataset]  # split -> unaugmented batches in index order
    steps_per_epoch: int
    cached_sources: list[tf.data.Dataset]  # iterating each once fills every cache
    _one_epoch: Callable[[int, bool], tf.data.Dataset]  # (seed, rerandomize) -> one epoch's batches
    _seed: int

    def epochs(self, first: int, stop: int) -> tf.data.Dataset:
        """Epochs ``first`` to ``stop - 1`` (0-based) back to back, for ``fit(steps_per_epoch=...)``.

        Epoch ``e`` is drawn with a seed made of the pipeline seed and ``e`` alone, so it is the
        same batches whenever it is built: training resumed at epoch ``e`` continues exactly as
        the uninterrupted run would have.
        """
        if not 0 <= first < stop:
            raise ValueError(f"No epochs from {first} to {stop}.")
        seeds = (np.random.SeedSequence([self._seed, epoch]).generate_state(1)[0] for epoch in range(first, stop))
        epochs = [self._one_epoch(int(seed), False) for seed in seeds]
        return functools.reduce(tf.data.Dataset.concatenate, epochs).prefetch(AUTOTUNE)


def _one_hot(num_classes: int):
    return lambda images, labels: (images, tf.one_hot(labels, num_classes))


def build_datasets(frame: pd.DataFrame, num_classes: int, settings: PipelineSettings) -> Datasets:
    """Build train and evaluation datasets from an index frame (columns path, label_index, split)."""
    train_frame = frame[frame["split"] == "train"]
    if train_frame.empty:
        raise ValueError("No training images: the index has no rows with split 'train'.")
    to_one_hot = _one_hot(num_classes)

    if settings.sampler == "balanced":
        # One cached stream per class, each reshuffled and repeated; every draw picks a class with
        # equal probability (PyTorch's WeightedRandomSampler with reciprocal-count weights, except
        # that within a class images are drawn without replacement until all were seen).
        groups = [group for _, group in train_frame.groupby("label_index", sort=True)]
        per_class = [
            decoded_dataset(group, settings.image_size, settings.cache, f"train_class{label}")
            for label, group in zip(sorted(train_frame["label_index"].unique()), groups)
        ]

        def sample(seed: int, rerandomize: bool) -> tf.data.Dataset:
            # Within an epoch a class stream that runs out is reshuffled, whatever ``rerandomize``.
            streams = [
                source.shuffle(len(group), seed=seed + i, reshuffle_each_iteration=True).repeat()
                for i, (source, group) in enumerate(zip(per_class, groups))
            ]
            return tf.data.Dataset.sample_from_datasets(
                streams,
                weights=[1.0 / len(streams)] * len(streams),
                seed=seed,
                rerandomize_each_iteration=rerandomize,
            ).take(len(train_frame))

        cached_sources = per_class
        train_eval_source = per_class[0]
        for source in per_class[1:]:
            train_eval_source = train_eval_source.concatenate(source)
    elif settings.sampler == "none":
        train_source = decoded_dataset(train_frame, settings.image_size, settings.cache, "train")

        def sample(seed: int, rerandomize: bool) -> tf.data.Dataset:
            return train_source.shuffle(len(train_frame), seed=seed, reshuffle_each_iteration=rerandomize)

        cached_sources = [train_source]
        train_eval_source = train_source
    else:
        raise ValueError(f"--sampler={settings.sampler!r} is not one of balanced, none.")

    def one_epoch(seed: int, rerandomize: bool) -> tf.data.Dataset:
        """One epoch's augmented batches drawn with ``seed``; ``rerandomize``: a new draw per iteration."""
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=rerandomize).map(
            lambda s: tf.stack([s, tf.constant(0, tf.int64)])
        )
        return (
            tf.data.Dataset.zip((sample(seed, rerandomize).batch(settings.batch_size), batch_seeds))
            .map(
                lambda batch, seed: (augment_batch(batch[0], seed, settings), batch[1]),
                num_parallel_calls=AUTOTUNE,
            )
            .map(to_one_hot)
        )

    evaluation = {"train": train_eval_source.batch(settings.batch_size).map(to_one_hot).prefetch(AUTOTUNE)}
    for split in ("val", "test"):
        split_frame = frame[frame["split"] == split]
        if len(split_frame):
            source = decoded_dataset(split_frame, settings.image_size, settings.cache, split)
            cached_sources.append(source)
            evaluation[split] = source.batch(settings.batch_size).map(to_one_hot).prefetch(AUTOTUNE)

    return Datasets(
        train=one_epoch(settings.seed, True).prefetch(AUTOTUNE),
        evaluation=evaluation,
        steps_per_epoch=math.ceil(len(train_frame) / settings.batch_size),
        cached_sources=cached_sources,
        _one_epoch=one_epoch,
        _seed=settings.seed,
    )


def fill_caches(datasets: Datasets, log_every_s: float = 10.0) -> float:
    """Decode every image once so that each cache is complete before training; returns seconds.

    Filling the caches up front makes the first epoch as fast as the others and keeps tf.data from
    discarding caches that a class-balanced epoch reads only partly.
    """
    start = last_log = time.perf_counter()
    total = 0
    for source in datasets.cached_sources:
        for images, _ in source.batch(256).prefetch(2):
            total += int(images.shape[0])
            now = time.perf_counter()
            if now - last_log >= log_every_s:
                logger.info("decoded %d images (%.0f images/s)", total, total / (now - start))
                last_log = now
    elapsed = time.perf_counter() - start
    logger.info("decoded and cached %d images in %.1f s", total, elapsed)
    return elapsed
