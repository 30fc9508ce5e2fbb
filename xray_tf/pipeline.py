"""tf.data input pipeline: decode once, cache uint8, then sample, augment and batch every epoch.

Order of work, chosen so that the expensive part happens once:

1. read + decode (JPEG/PNG/BMP/GIF of any size, grey/RGB/RGBA, 8 or 16 bit) to one grey uint8
   channel, resize to ``image_size`` (bilinear with antialiasing), all in parallel;
2. cache the resized uint8 images (in memory or in files), one cache per class when sampling is
   class-balanced so each class can be drawn from independently;
3. per epoch: shuffle, class-balanced sampling, batch, then augment whole batches (flips,
   rotation) with stateless random ops seeded from the pipeline seed, prefetch.

Augmentation runs after batching, vectorised, and is seeded per batch, so two pipelines built
with the same seed yield identical batches whatever the parallelism.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time

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


def decode_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one image file and return it as ``uint8 [image_size, image_size, 1]``.

    ``decode_image`` with ``channels=1`` converts colour to grey and ``dtype=uint8`` rescales
    16-bit PNGs; the resize squashes to a square like the Kaggle copies of the data.
    """
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=1, dtype=tf.uint8, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.saturate_cast(tf.round(image), tf.uint8)


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

    train: tf.data.Dataset  # augmented, sampled, one epoch per iteration
    evaluation: dict[str, tf.data.Dataset]  # split -> unaugmented batches in index order
    steps_per_epoch: int
    cached_sources: list[tf.data.Dataset]  # iterating each once fills every cache


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
        streams = [
            source.shuffle(len(group), seed=settings.seed + i, reshuffle_each_iteration=True).repeat()
            for i, (source, group) in enumerate(zip(per_class, groups))
        ]
        sampled = tf.data.Dataset.sample_from_datasets(
            streams,
            weights=[1.0 / len(streams)] * len(streams),
            seed=settings.seed,
            rerandomize_each_iteration=True,
        ).take(len(train_frame))
        cached_sources = per_class
        train_eval_source = per_class[0]
        for source in per_class[1:]:
            train_eval_source = train_eval_source.concatenate(source)
    elif settings.sampler == "none":
        source = decoded_dataset(train_frame, settings.image_size, settings.cache, "train")
        sampled = source.shuffle(len(train_frame), seed=settings.seed, reshuffle_each_iteration=True)
        cached_sources = [source]
        train_eval_source = source
    else:
        raise ValueError(f"--sampler={settings.sampler!r} is not one of balanced, none.")

    batch_seeds = tf.data.Dataset.random(seed=settings.seed, rerandomize_each_iteration=True).map(
        lambda s: tf.stack([s, tf.constant(0, tf.int64)])
    )
    train = (
        tf.data.Dataset.zip((sampled.batch(settings.batch_size), batch_seeds))
        .map(
            lambda batch, seed: (augment_batch(batch[0], seed, settings), batch[1]),
            num_parallel_calls=AUTOTUNE,
        )
        .map(to_one_hot)
        .prefetch(AUTOTUNE)
    )

    evaluation = {"train": train_eval_source.batch(settings.batch_size).map(to_one_hot).prefetch(AUTOTUNE)}
    for split in ("val", "test"):
        split_frame = frame[frame["split"] == split]
        if len(split_frame):
            source = decoded_dataset(split_frame, settings.image_size, settings.cache, split)
            cached_sources.append(source)
            evaluation[split] = source.batch(settings.batch_size).map(to_one_hot).prefetch(AUTOTUNE)

    return Datasets(
        train=train,
        evaluation=evaluation,
        steps_per_epoch=math.ceil(len(train_frame) / settings.batch_size),
        cached_sources=cached_sources,
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
