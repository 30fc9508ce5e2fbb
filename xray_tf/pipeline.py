"""tf.data input pipeline: decode once, keep uint8, then sample, augment and batch every epoch.

Order of work, chosen so that the expensive part happens once:

1. read + decode (JPEG, PNG, BMP, GIF (first frame) or WebP of any size; grey, RGB, RGBA or CMYK;
   8 or 16 bit) to one grey uint8 channel, resize to ``image_size`` (bilinear with antialiasing),
   all in parallel. This single pass (``decode_images``) is also the pre-training check: rows that
   fail are dropped with ``ignore_errors`` and only they are examined again to say why;
2. keep the resized uint8 images as one array (in memory, or a memory-mapped ``.npy`` file in a
   cache directory for data larger than RAM);
3. per epoch: draw the whole epoch's rows up front in NumPy from ``(seed, epoch)`` (class-balanced
   or a permutation), gather each batch from the array, augment whole batches (flips, rotation)
   with stateless random ops seeded per batch, prefetch.

Every random choice of epoch ``e`` derives from ``(seed, e)`` alone and no step depends on thread
timing, so two pipelines built with the same seed yield identical batches whatever the parallelism,
and a run resumed at epoch ``e`` sees exactly the batches the uninterrupted run would have seen.
Drawing indices up front replaced per-element tf.data sampling (cache -> shuffle -> repeat ->
sample_from_datasets -> batch); see BENCHMARKS.md section 1 for what each change gave.
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


def _without_autotune_thread(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning turned off, so its iterators start no tuning thread.

    Deleting an autotuned iterator waits for that thread to finish its current sleep, which grows
    after every tuning round: the training stream, freed when ``fit`` returns, held a 3-epoch run
    for 24-30 s in 4 of 7 runs, and shorter-lived iterators lost up to a second each (BENCHMARKS.md,
    section 3). Without it, ``AUTOTUNE`` parallelism is the number of cores and ``prefetch`` keeps
    tuning its own buffer; cached epochs ran as fast as with autotuning (same section).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


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


def _resize_rows(image: tf.Tensor, size: int) -> tf.Tensor:
    """Antialiased bilinear resampling of the rows of ``[H, W, C]``, to ``[size, W, C]``.

    Each row's pixels and channels are handed to ``tf.image.resize`` as the channels of a
    ``[1, H, 1, W * C]`` image: its kernel, ScaleAndTranslate, is ~4x faster over many channels
    than over the one of a grey X-ray. The reshape copies nothing, and the kernel makes no float
    copy of the full-size image either: resizing a 6000 x 6000 RGB image raised the process's
    peak memory by 32 MB, not the 432 MB such a copy takes.
    """
    shape = tf.shape(image)
    flat = tf.reshape(image, [1, shape[0], 1, shape[1] * shape[2]])
    resampled = tf.image.resize(flat, (size, 1), method="bilinear", antialias=True)
    return tf.reshape(resampled, [size, shape[1], shape[2]])


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear, antialiased resize of ``[H, W, C]`` to a float square; skipped when it already has that size.

    The same separable filter as ``tf.image.resize(..., antialias=True)``, with the same pixels
    (bit-identical on every image checked), applied one axis at a time by ``_resize_rows``: rows, then the
    columns of the already shorter image. A large grey JPEG now spends ~0.4 ms instead of ~1.6 ms
    resizing, next to 2-10 ms decoding.
    """
    def resize() -> tf.Tensor:
        rows = _resize_rows(image, image_size)
        columns = _resize_rows(tf.transpose(rows, [1, 0, 2]), image_size)
        return tf.transpose(columns, [1, 0, 2])

    same = tf.reduce_all(tf.shape(image)[:2] == image_size)
    return tf.cond(same, lambda: tf.cast(image, tf.float32), resize)


def _decode_grey_jpeg(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """A grey or YCbCr JPEG as its luma channel, DCT-downscaled by 2, 4 or 8 while still >= ``image_size``.

    libjpeg hands out the Y channel directly (no colour conversion) and can scale by 1/2, 1/4 or 1/8
    while decoding, which skips most of the work on a large image; the resize finishes the job.
    """
    shortest = tf.reduce_min(tf.io.extract_jpeg_shape(raw)[:2])
    # Output sides are ceil(side / ratio); take the largest ratio that keeps them >= image_size.
    branch = tf.reduce_sum(tf.cast(-(-shortest // (2, 4, 8)) >= image_size, tf.int32))
    return tf.switch_case(branch, [
        functools.partial(tf.io.decode_jpeg, raw, channels=1, ratio=ratio) for ratio in (1, 2, 4, 8)
    ])


def _decode_any(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """Any supported format as float grey ``[image_size, image_size, 1]``, resized in colour first.

    Files are decoded with their own channels, since TensorFlow's grey conversion (``channels=1``)
    fails on GIF, BMP, WebP and CMYK JPEG. Colour (RGB, RGBA, CMYK) is resized in colour, alpha
    dropped, and then turned grey: resizing first keeps a huge colour image's memory small.
    ``dtype=uint8`` rescales 16-bit PNGs.
    """
    image = tf.io.decode_image(raw, channels=0, dtype=tf.uint8, expand_animations=False)
    colour = tf.shape(image)[-1] >= 3  # else grey, or grey + alpha
    image = tf.cond(colour, lambda: image[..., :3], lambda: image[..., :1])
    image = _resize(image, image_size)
    return tf.cond(colour, lambda: _luma(image), lambda: image)


def decode_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one image file and return it as ``uint8 [image_size, image_size, 1]``.

    Grey and YCbCr JPEGs, most X-rays, take a fast path (``_decode_grey_jpeg``); everything else,
    CMYK JPEGs included, goes through ``_decode_any``. The resize squashes to a square like the
    Kaggle copies.
    """
    raw = tf.io.read_file(path)
    jpeg = tf.strings.substr(raw, 0, 3) == b"\xff\xd8\xff"
    grey_jpeg = tf.logical_and(jpeg, tf.cond(jpeg, lambda: tf.io.extract_jpeg_shape(raw)[2] != 4,
                                             lambda: tf.constant(False)))
    image = tf.cond(grey_jpeg, lambda: _resize(_decode_grey_jpeg(raw, image_size), image_size),
                    lambda: _decode_any(raw, image_size))
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


@dataclasses.dataclass(frozen=True)
class DecodedImages:
    """The result of the one decoding pass: each row's image (if kept) and why the others failed."""

    paths: tuple[str, ...]
    images: np.ndarray | None  # uint8 [len(paths), size, size, 1] in RAM or memory-mapped; None: not kept
    unreadable: dict[str, str]  # path -> why it cannot be decoded
    seconds: float  # spent in decode_images (little when a complete cache file was reused)

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Row of ``images`` holding each of ``paths``."""
        row_of = {path: row for row, path in enumerate(self.paths)}
        return np.fromiter((row_of[path] for path in paths), dtype=np.int64, count=len(paths))


def _images_cache_name(paths: Sequence[str], image_size: int) -> str:
    """A cache-file name that changes whenever the list of files or the size changes."""
    digest = hashlib.sha1(f"{image_size}\n".encode())
    for path in paths:
        digest.update(f"{path}\n".encode())
    return f"images_{image_size}px_{digest.hexdigest()[:16]}"


def _decode_pass(paths: list[str], image_size: int, out: np.ndarray | None, log_every_s: float) -> np.ndarray:
    """Decode every path once, in parallel, into ``out`` (if given); returns which rows decoded.

    Rows are decoded out of order (``deterministic=False``) and tagged with their row number, so
    one slow file does not hold up the rest; failures are dropped by ``ignore_errors``.
    """
    decoded = (
        tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=str))
        .enumerate()
        # The image is returned even when not kept: an unused decode would be optimised away.
        .map(lambda row, path: (row, decode_image(path, image_size)), num_parallel_calls=AUTOTUNE,
             deterministic=False)
        .ignore_errors()
        .batch(64)
        .prefetch(2)
    )
    decoded = _without_autotune_thread(decoded)
    readable = np.zeros(len(paths), dtype=bool)
    start = last_log = time.perf_counter()
    for rows, images in decoded:
        rows = rows.numpy()
        readable[rows] = True
        if out is not None:
            out[rows] = images.numpy()
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            logger.info("decoded %d of %d images (%.0f images/s)", readable.sum(), len(paths),
                        readable.sum() / (now - start))
            last_log = now
    return readable


def decode_images(paths: Sequence[str], image_size: int, keep: str = "memory",
                  log_every_s: float = 10.0) -> DecodedImages:
    """Decode every file once, as training will, keeping the images as ``keep`` says.

    ``keep``: "memory" (one uint8 array), "none" (only check: nothing is kept or written) or a
    directory, where the images go to a memory-mapped ``.npy`` file (for data larger than RAM)
    that a later call with the same files and size reuses instead of decoding. Only the rows that
    failed are decoded again, one by one, to say why (``unreadable``). Progress is logged every
    ``log_every_s`` seconds, since a large dataset takes minutes.
    """
    paths = list(paths)
    start = time.perf_counter()
    shape = (len(paths), image_size, image_size, 1)
    images, readable = None, None
    if keep not in ("memory", "none"):
        os.makedirs(keep, exist_ok=True)
        stem = os.path.join(keep, _images_cache_name(paths, image_size))
        if os.path.isfile(stem + ".npy") and os.path.isfile(stem + ".readable.npy"):
            images, readable = np.load(stem + ".npy", mmap_mode="r"), np.load(stem + ".readable.npy")
            logger.info("reusing the decoded images in %s.npy", stem)
        else:
            partial = stem + ".partial.npy"
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            readable = _decode_pass(paths, image_size, out, log_every_s)
            out.flush()
            del out
            np.save(stem + ".readable.npy", readable)
            os.replace(partial, stem + ".npy")  # complete only once both files are there
            images = np.load(stem + ".npy", mmap_mode="r")
    elif keep == "memory":
        images = np.empty(shape, dtype=np.uint8)
        readable = _decode_pass(paths, image_size, images, log_every_s)
    else:
        readable = _decode_pass(paths, image_size, None, log_every_s)
    unreadable = {}
    for row in np.flatnonzero(~readable):
        reason = _why_unreadable(paths[row], image_size)
        if reason is not None:
            unreadable[paths[row]] = reason
        elif images is not None:  # failed in the pass but decodes now (a flaky network drive?)
            if not images.flags.writeable:  # a cache file, opened read-only so a shared one can be read
                images = np.load(images.filename, mmap_mode="r+")
            images[row] = decode_image(tf.constant(paths[row]), image_size).numpy()
    seconds = time.perf_counter() - start
    logger.info("decoded %d images in %.1f s: %d cannot be decoded", len(paths), seconds, len(unreadable))
    return DecodedImages(tuple(paths), images, unreadable, seconds)


def list_unreadable(unreadable: dict[str, str]) -> str:
    """``unreadable`` (path -> reason) as one indented line per file, sorted: for error messages."""
    return "\n".join(f"  {path}: {reason}" for path, reason in sorted(unreadable.items()))


def find_unreadable(paths: Sequence[str], image_size: int, log_every_s: float = 10.0) -> dict[str, str]:
    """``{path: reason}`` for each file that does not decode; the images themselves are not kept."""
    return decode_images(paths, image_size, "none", log_every_s).unreadable


def decoded_dataset(frame: pd.DataFrame, image_size: int) -> tf.data.Dataset:
    """``(uint8 image, int64 label_index)`` for each row of ``frame``, in row order, decoded as they
    stream (for one pass over files too many to hold, e.g. the dataset statistics); training and
    evaluation decode with ``decode_images`` instead, which also reports every unreadable file."""
    paths = tf.data.Dataset.from_tensor_slices(
        (frame["path"].to_numpy(dtype=str), frame["label_index"].to_numpy(dtype=np.int64))
    )
    return _without_autotune_thread(
        paths.map(lambda path, label: (decode_image(path, image_size), label), num_parallel_calls=AUTOTUNE))


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

    # Only the images chosen for rotation are transformed: at p = 0.3 that is a third of the work of
    # transforming the whole batch with angle 0 for the others.
    max_radians = settings.rotation_degrees * math.pi / 180.0
    angles = tf.random.stateless_uniform([batch], angle_seed, -max_radians, max_radians)
    rotated = tf.where(chosen(settings.rotation_prob, rotate_seed))
    size = settings.image_size
    turned = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.gather_nd(images, rotated),
        transforms=rotation_transforms(tf.gather_nd(angles, rotated), size, size),
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.tensor_scatter_nd_update(images, rotated, turned)


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
        unreadable = sorted(set(self.paths) & set(decoded.unreadable))
        if unreadable:
            raise ValueError(f"{len(unreadable)} image file(s) cannot be decoded, e.g. {unreadable[0]}: "
                             f"{decoded.unreadable[unreadable[0]]}")
        self._rows = decoded.rows(self.paths)
        self.decoded = decoded

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        if self.decoded is None:
            raise RuntimeError("The images are not decoded yet: call fill_caches(datasets) first.")
        return self.decoded.images[self._rows[positions]]

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

    def epochs(self, first: int, stop: int, worker: int = 0, workers: int = 1, pieces: int = 1) -> tf.data.Dataset:
        """Epochs ``first`` to ``stop - 1`` (0-based) back to back, for ``fit(steps_per_epoch=...)``.

        Epoch ``e``'s rows and per-batch augmentation seeds are drawn in NumPy from a seed made of
        the pipeline seed and ``e`` alone, so it is the same batches whenever it is built: training
        resumed at epoch ``e`` continues exactly as the uninterrupted run would have. Decodes the
        images first if ``fill_caches`` has not.

        For data-parallel training (``distribution``), ``worker`` of ``workers`` keeps its
        contiguous share of every global batch, cut into ``pieces`` consecutive elements (one per
        replica, for ``tf.distribute``). Every worker assembles and augments the whole global batch
        and keeps its share, so each image gets the same pixels whatever the number of replicas,
        and the replicas together train on exactly the batches one device would see.
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
        if workers > 1 or pieces > 1:
            if batch_size % (workers * pieces):
                raise ValueError(f"--batch_size={batch_size} does not split evenly over {workers * pieces} replicas.")
            share = batch_size // workers

            def keep_share(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                start = worker * share
                return (tf.reshape(images[start:start + share], [pieces, share // pieces, *images.shape[1:]]),
                        tf.reshape(labels[start:start + share], [pieces, share // pieces, labels.shape[-1]]))

            batches = batches.map(keep_share).unbatch()
        return _without_autotune_thread(batches.prefetch(AUTOTUNE))

    def evaluation_share(self, split: str, worker: int = 0, workers: int = 1, multiple: int = 1) -> tf.data.Dataset:
        """``evaluation[split]`` for data-parallel evaluation: each batch cut to a multiple of
        ``multiple`` images (the replica count; only the last batch can be shorter, and it loses at
        most ``multiple - 1`` images), of which ``worker`` of ``workers`` keeps its contiguous share."""

        def keep_share(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            share = tf.shape(images)[0] // multiple * multiple // workers
            return images[worker * share:(worker + 1) * share], labels[worker * share:(worker + 1) * share]

        return self.evaluation[split].map(keep_share).filter(lambda images, _: tf.shape(images)[0] > 0)


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

    def labelled(positions: tf.Tensor, pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return pixels, tf.one_hot(tf.gather(labels, positions), num_classes)

    def augmented(positions: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return labelled(positions, augment_batch(images.take(positions), seed, settings))

    def batches(rows: tf.data.Dataset) -> tf.data.Dataset:
        # Deterministic order: batch i of the output is always row i of the input.
        return rows.map(augmented, num_parallel_calls=AUTOTUNE)

    evaluation = {}
    for split in ("train", "val", "test"):
        positions = np.flatnonzero((frame["split"] == split).to_numpy())
        if len(positions):
            evaluation[split] = _without_autotune_thread(
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
