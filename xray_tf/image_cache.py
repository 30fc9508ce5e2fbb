"""The decode-once cache: every file of a dataset decoded in one parallel pass, kept as uint8.

The pass is also the pre-training check. Files that must not be decoded (no regular file, more
pixels than ``max_pixels``) are refused from their headers first; files that could take much
memory are decoded one at a time after the parallel pass; rows that fail are dropped with
``ignore_errors`` and only they are examined again, one by one, to say why. The images are kept as one array in memory,
or as a ``.npy`` file in a cache directory for data larger than RAM, which a later run over the
same files at the same size reuses instead of decoding. That file is written and read by
positioned I/O (``os.pwrite``, ``os.preadv``) rather than through its memory map: a map's pages
count in the process's resident memory as they are touched, so an epoch over 100,000 images would
show the whole 5 GB cache as the process's own. A ``DecodedImages`` records the size it was
decoded at, and the pipeline refuses one of another size.
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

from xray_tf import decode, image_headers
from xray_tf.config import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

_PARALLEL = os.cpu_count() or 1  # decodes at a time in the main pass, one a core


class _RowWriter:
    """``writer[rows] = images`` into the rows of a ``.npy`` file by positioned writes (module docstring)."""

    def __init__(self, path: str, shape: tuple[int, ...]):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # full size, header written
        self._offset, self._row_bytes = header.offset, int(np.prod(shape[1:]))
        del header
        self._fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, rows: np.ndarray, images: np.ndarray) -> None:
        for row, image in zip(rows, images):
            os.pwrite(self._fd, np.ascontiguousarray(image).data, self._offset + int(row) * self._row_bytes)

    def close(self) -> None:
        os.fsync(self._fd)  # on disk before the file is renamed complete
        os.close(self._fd)


def read_rows(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images[rows]``, read from the file by positioned reads when ``images`` is a cache file's map."""
    if not isinstance(images, np.memmap):
        return images[rows]
    out = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    row_bytes = out[0].nbytes
    fd = os.open(images.filename, os.O_RDONLY)
    try:
        for i, row in enumerate(rows):
            if os.preadv(fd, [out[i].reshape(-1).data], images.offset + int(row) * row_bytes) != row_bytes:
                raise OSError(f"{images.filename}: shorter than its header says (a damaged cache; delete it).")
    finally:
        os.close(fd)
    return out


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


def _decode_pass(paths: list[str], rows: np.ndarray, image_size: int, parallel: int,
                 out: np.ndarray | _RowWriter | None, readable: np.ndarray, log_every_s: float) -> None:
    """Decode ``paths[rows]``, ``parallel`` at a time, into ``out`` (if given) and mark in ``readable`` which did.

    Rows are decoded out of order (``deterministic=False``) and tagged with their row number, so
    one slow file does not hold up the rest; failures are dropped by ``ignore_errors``.
    """
    if not len(rows):
        return
    decoded = (
        tf.data.Dataset.from_tensor_slices((rows, np.asarray(paths, dtype=str)[rows]))
        # The image is returned even when not kept: an unused decode would be optimised away.
        .map(lambda row, path: (row, decode.decode_image(path, image_size)), num_parallel_calls=parallel,
             deterministic=False)
        .ignore_errors()
        .batch(64)
        .prefetch(2)
    )
    decoded = decode.without_autotune_thread(decoded)
    start = last_log = time.perf_counter()
    for done, images in decoded:
        done = done.numpy()
        readable[done] = True
        if out is not None:
            out[done] = images.numpy()
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            logger.info("decoded %d of %d images (%.0f images/s)", readable.sum(), len(paths),
                        readable[rows].sum() / (now - start))
            last_log = now


def _decode_passes(paths: list[str], checks: list[image_headers.Precheck], image_size: int,
                   out: np.ndarray | _RowWriter | None, log_every_s: float) -> np.ndarray:
    """Decode every file that ``checks`` lets through, within ``image_headers.DECODE_MEMORY``; return which decoded.

    One pass decodes ``_PARALLEL`` files at a time, each of which may hold at most
    ``DECODE_MEMORY / _PARALLEL``; the files that may hold more are decoded afterwards one at a time.
    """
    readable = np.zeros(len(paths), dtype=bool)
    allowed = np.array([check.problem is None for check in checks], dtype=bool)
    alone = np.array([check.decodes_alone(_PARALLEL) for check in checks], dtype=bool)
    _decode_pass(paths, np.flatnonzero(allowed & ~alone), image_size, _PARALLEL, out, readable, log_every_s)
    _decode_pass(paths, np.flatnonzero(allowed & alone), image_size, 1, out, readable, log_every_s)
    return readable


def decode_images(paths: Sequence[str], image_size: int, keep: str = "memory", log_every_s: float = 10.0,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImages:
    """Decode every file once, as training will, keeping the images as ``keep`` says.

    ``keep``: "memory" (one uint8 array), "none" (only check: nothing is kept or written) or a
    directory, where the images go to a memory-mapped ``.npy`` file (for data larger than RAM)
    that a later call with the same files and size reuses instead of decoding. A path that is no
    regular readable file, or whose header declares more than ``max_pixels``, is never opened for
    decoding: it goes to ``unreadable`` with ``image_headers.precheck``'s words. Only the rows that failed
    to decode are decoded again, one by one, to say why. Progress is logged every ``log_every_s``
    seconds, since a large dataset takes minutes.

    Memory: the decodes running at one time hold at most ``image_headers.DECODE_MEMORY`` (2 GiB) of
    files and decoded arrays together, whatever the number of cores, as estimated from each header
    (``image_headers.precheck``); a file estimated above that alone is decoded by itself, so it then costs
    its own estimate.
    """
    paths = list(paths)
    start = time.perf_counter()
    checks = [image_headers.precheck(path, max_pixels) for path in paths]
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
            writer = _RowWriter(partial, shape)
            try:
                readable = _decode_passes(paths, checks, image_size, writer, log_every_s)
            finally:
                writer.close()
            np.save(stem + ".readable.npy", readable)
            os.replace(partial, stem + ".npy")  # complete only once both files are there
            images = np.load(stem + ".npy", mmap_mode="r")
    elif keep == "memory":
        images = np.empty(shape, dtype=np.uint8)
        readable = _decode_passes(paths, checks, image_size, images, log_every_s)
    else:
        readable = _decode_passes(paths, checks, image_size, None, log_every_s)
    unreadable = {path: check.problem for path, check in zip(paths, checks) if check.problem is not None}
    for row in np.flatnonzero(~readable):
        if paths[row] in unreadable:
            continue
        reason = decode.why_unreadable(paths[row], image_size, max_pixels)
        if reason is not None:
            unreadable[paths[row]] = reason
        elif images is not None:  # failed in the pass but decodes now (a flaky network drive?)
            if not images.flags.writeable:  # a cache file, opened read-only so a shared one can be read
                images = np.load(images.filename, mmap_mode="r+")
            images[row] = decode.decode_image(tf.constant(paths[row]), image_size).numpy()
    seconds = time.perf_counter() - start
    logger.info("decoded %d images in %.1f s: %d cannot be decoded", len(paths), seconds, len(unreadable))
    return DecodedImages(tuple(paths), image_size, images, unreadable, seconds)


def find_unreadable(paths: Sequence[str], image_size: int, log_every_s: float = 10.0,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, str]:
    """``{path: reason}`` for each file that does not decode or is refused; the images themselves are not kept."""
    return decode_images(paths, image_size, "none", log_every_s, max_pixels).unreadable
