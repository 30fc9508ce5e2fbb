"""The decode-once cache: every file of a dataset decoded in one parallel pass, kept as uint8.

The pass is also the pre-training check: rows that fail are dropped with ``ignore_errors`` and
only they are examined again, one by one, to say why. The images are kept as one array in memory,
or as a memory-mapped ``.npy`` file in a cache directory for data larger than RAM, which a later
run over the same files at the same size reuses instead of decoding. A ``DecodedImages`` records
the size it was decoded at, and the pipeline refuses one of another size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from xray_tf.decode import (
    AUTOTUNE,
    decode_image,
    why_unreadable,
    without_autotune_thread,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodedImages:
    """The result of the one decoding pass: each row's image (if kept) and why the others failed."""

    paths: tuple[str, ...]
    image_size: int  # the side every image was resized to
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
    decoded = without_autotune_thread(decoded)
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
            if images.shape != shape or readable.shape != shape[:1]:
                raise ValueError(f"{stem}.npy holds images of shape {images.shape}, not {shape}: a damaged "
                                 f"cache; delete it and run again.")
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
        reason = why_unreadable(paths[row], image_size)
        if reason is not None:
            unreadable[paths[row]] = reason
        elif images is not None:  # failed in the pass but decodes now (a flaky network drive?)
            if not images.flags.writeable:  # a cache file, opened read-only so a shared one can be read
                images = np.load(images.filename, mmap_mode="r+")
            images[row] = decode_image(tf.constant(paths[row]), image_size).numpy()
    seconds = time.perf_counter() - start
    logger.info("decoded %d images in %.1f s: %d cannot be decoded", len(paths), seconds, len(unreadable))
    return DecodedImages(tuple(paths), image_size, images, unreadable, seconds)


def find_unreadable(paths: Sequence[str], image_size: int, log_every_s: float = 10.0) -> dict[str, str]:
    """``{path: reason}`` for each file that does not decode; the images themselves are not kept."""
    return decode_images(paths, image_size, "none", log_every_s).unreadable
