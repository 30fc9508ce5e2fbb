"""tf.data input pipeline over images decoded once: sample, augment and batch every epoch.

Per epoch the whole epoch's rows are drawn up front in NumPy from ``(seed, epoch)`` (class-balanced
or a permutation); each batch is gathered from the uint8 images of the decode-once cache
(``image_cache``) and augmented as a whole with stateless random ops seeded per batch
(``augment``: the preset's flips, rotation and more, then MixUp or CutMix when on); evaluation
batches are the images as decoded. Every random choice of epoch ``e`` derives from ``(seed, e)``
alone and no step depends on thread timing, so two pipelines built with the same seed yield
identical batches whatever the parallelism, and a run resumed at epoch ``e`` sees exactly the
batches the uninterrupted run would have seen. Images stay uint8: the model's first layer
converts them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import tensorflow as tf

from xray_tf.augment import augment_batch, check_preset, mix_batch
from xray_tf.decode import AUTOTUNE, decode_image, without_autotune_thread
from xray_tf.image_cache import DecodedImages, decode_images, read_rows


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
    augment: str = "paper"  # "paper" or "strong" (xray_tf.augment)
    crop_scale_min: float = 0.6
    crop_aspect_max: float = 4 / 3
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off
    seed: int = 0


class _FrameImages:
    """The uint8 images of an index frame's rows, by row position.

    With a cache they are gathered from the ``DecodedImages`` attached by ``fill_caches`` (a NumPy
    array or memory map, read through ``numpy_function``); with ``cache="none"`` each batch's
    files are decoded again.
    """

    def __init__(self, frame: pd.DataFrame, settings: PipelineSettings):
        self.paths = frame["path"].to_numpy(dtype=str)
        self.image_size = settings.image_size
        self.cached = settings.cache != "none"
        self.decoded: DecodedImages | None = None
        self._rows: np.ndarray | None = None  # frame position -> row of self.decoded.images

    def attach(self, decoded: DecodedImages) -> None:
        if decoded.image_size != self.image_size:
            raise ValueError(f"The images were decoded at {decoded.image_size} px; this pipeline needs "
                             f"{self.image_size} px.")
        unreadable = sorted(set(self.paths) & set(decoded.unreadable))
        if unreadable:
            raise ValueError(f"{len(unreadable)} image file(s) cannot be decoded, e.g. {unreadable[0]}: "
                             f"{decoded.unreadable[unreadable[0]]}")
        self._rows = decoded.rows(self.paths)
        self.decoded = decoded

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        if self.decoded is None:
            raise RuntimeError("The images are not decoded yet: call fill_caches(datasets) first.")
        return read_rows(self.decoded.images, self._rows[positions])

    def take(self, positions: tf.Tensor) -> tf.Tensor:
        """``uint8 [n, size, size, 1]``: the images of frame rows ``positions``."""
        size = self.image_size
        if self.cached:
            images = tf.numpy_function(self._gather, [positions], tf.uint8, stateful=False)
        else:
            images = tf.map_fn(lambda path: decode_image(path, size), tf.gather(self.paths, positions),
                               fn_output_signature=tf.uint8)
        return tf.ensure_shape(images, [None, size, size, 1])


def _balanced_draw(rng: np.random.Generator, groups: list[np.ndarray], draws: int) -> np.ndarray:
    """``draws`` rows, each from a class picked with equal probability (PyTorch's WeightedRandomSampler
    with reciprocal-count weights), except that within a class rows are drawn without replacement
    until all were seen (a new permutation each time the class runs out)."""
    classes = rng.integers(0, len(groups), draws)
    drawn = np.empty(draws, dtype=np.int64)
    for label, members in enumerate(groups):
        slots = np.flatnonzero(classes == label)
        rounds = max(1, -(-len(slots) // len(members)))
        drawn[slots] = np.concatenate([rng.permutation(members) for _ in range(rounds)])[: len(slots)]
    return drawn


@dataclasses.dataclass
class Datasets:
    """The batched datasets for fit and evaluation, over images decoded once (``fill_caches``)."""

    evaluation: dict[str, tf.data.Dataset]  # split -> unaugmented batches in index order
    steps_per_epoch: int
    images: _FrameImages
    settings: PipelineSettings
    _draw: Callable[[np.random.Generator, int], np.ndarray]  # (rng, n) -> one epoch's n frame positions
    _batches: Callable[[tf.data.Dataset], tf.data.Dataset]  # (positions, seed) -> augmented batches

    @property
    def images_per_epoch(self) -> int:
        """Every training batch is full (one compiled train step; divisible across replicas), so an
        epoch is ``steps_per_epoch * batch_size`` draws: the train split rounded up to whole batches."""
        return self.steps_per_epoch * self.settings.batch_size

    def epochs(self, first: int, stop: int) -> tf.data.Dataset:
        """Epochs ``first`` to ``stop - 1`` (0-based) back to back, for ``fit(steps_per_epoch=...)``.

        Epoch ``e``'s rows and per-batch augmentation seeds are drawn in NumPy from a seed made of
        the pipeline seed and ``e`` alone, so it is the same batches whenever it is built: training
        resumed at epoch ``e`` continues exactly as the uninterrupted run would have. Decodes the
        images first if ``fill_caches`` has not. Batches are global: ``distribution`` cuts
        each device's share out of them.
        """
        if not 0 <= first < stop:
            raise ValueError(f"No epochs from {first} to {stop}.")
        if self.images.cached and self.images.decoded is None:
            fill_caches(self)
        batch_size, steps = self.settings.batch_size, self.steps_per_epoch
        positions, seeds = [], []
        for epoch in range(first, stop):
            rng = np.random.default_rng(np.random.SeedSequence([self.settings.seed, epoch]))
            positions.append(self._draw(rng, self.images_per_epoch).reshape(steps, batch_size))
            seeds.append(rng.integers(0, np.iinfo(np.int64).max, size=(steps, 2)))
        rows = tf.data.Dataset.from_tensor_slices((np.concatenate(positions), np.concatenate(seeds)))
        batches = self._batches(rows)
        return without_autotune_thread(batches.prefetch(AUTOTUNE))


def build_datasets(frame: pd.DataFrame, num_classes: int, settings: PipelineSettings) -> Datasets:
    """Build train and evaluation datasets from an index frame (columns path, label_index, split).

    Nothing is decoded here: ``fill_caches`` attaches the images (decoding them if needed).
    """
    frame = frame.reset_index(drop=True)
    train = np.flatnonzero((frame["split"] == "train").to_numpy())
    if not len(train):
        raise ValueError("No training images: the index has no rows with split 'train'.")
    labels = frame["label_index"].to_numpy(dtype=np.int64)
    images = _FrameImages(frame, settings)

    if settings.sampler == "balanced":
        groups = [train[labels[train] == label] for label in np.unique(labels[train])]

        def draw(rng: np.random.Generator, draws: int) -> np.ndarray:
            return _balanced_draw(rng, groups, draws)
    elif settings.sampler == "none":
        def draw(rng: np.random.Generator, draws: int) -> np.ndarray:
            # Every training image once, then the first few again to fill the last batch.
            return np.resize(rng.permutation(train), draws)
    else:
        raise ValueError(f"--sampler={settings.sampler!r} is not one of balanced, none.")
    check_preset(settings)

    def labelled(positions: tf.Tensor, pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return pixels, tf.one_hot(tf.gather(labels, positions), num_classes)

    def augmented(positions: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels, one_hot = labelled(positions, augment_batch(images.take(positions), seed, settings))
        return mix_batch(pixels, one_hot, seed, settings)

    def batches(rows: tf.data.Dataset) -> tf.data.Dataset:
        # Deterministic order: batch i of the output is always row i of the input.
        return rows.map(augmented, num_parallel_calls=AUTOTUNE)

    evaluation = {}
    for split in ("train", "val", "test"):
        positions = np.flatnonzero((frame["split"] == split).to_numpy())
        if len(positions):
            evaluation[split] = without_autotune_thread(
                tf.data.Dataset.from_tensor_slices(positions)
                .batch(settings.batch_size)
                .map(lambda batch: labelled(batch, images.take(batch)), num_parallel_calls=AUTOTUNE)
                .prefetch(AUTOTUNE)
            )

    return Datasets(
        evaluation=evaluation,
        steps_per_epoch=math.ceil(len(train) / settings.batch_size),
        images=images,
        _draw=draw,
        _batches=batches,
        settings=settings,
    )


def fill_caches(datasets: Datasets, decoded: DecodedImages | None = None, log_every_s: float = 10.0) -> float:
    """Give ``datasets`` their decoded images; returns the seconds that decoding took.

    ``decoded``: the images of ``decode_images`` (training's pre-run check), so nothing is decoded
    twice; when it is None or kept no images, every image of ``datasets`` is decoded here, into
    the cache that the settings name. Nothing to do with ``cache="none"``: batches decode their files.
    """
    if not datasets.images.cached:
        return decoded.seconds if decoded is not None else 0.0
    if decoded is None or decoded.images is None:
        paths = list(dict.fromkeys(datasets.images.paths))
        decoded = decode_images(paths, datasets.settings.image_size, datasets.settings.cache, log_every_s)
    datasets.images.attach(decoded)
    return decoded.seconds
