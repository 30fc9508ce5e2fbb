"""One image file to one grey uint8 image, exactly as training sees it, and why a file fails.

``decode_image`` reads JPEG, PNG, BMP, GIF (first frame) or WebP of any size -- grey, RGB, RGBA
or CMYK, 8 or 16 bit -- and returns one grey uint8 channel resized to ``image_size`` (bilinear
with antialiasing). Training, evaluation, prediction and the figures all decode through it, so a
model never sees pixels prepared another way. ``why_unreadable`` turns TensorFlow's failure into
words that name the format (a TIFF, a truncated PNG, an HTML page saved as ``.jpeg``), after
``image_headers.precheck`` has refused what must not be decoded at all.
"""

from __future__ import annotations

import codecs
import functools
import os
import re

import numpy as np
import pandas as pd
import tensorflow as tf

from xray_tf import image_headers
from xray_tf.config import DEFAULT_MAX_PIXELS

AUTOTUNE = tf.data.AUTOTUNE


def without_autotune_thread(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning turned off, so its iterators start no tuning thread.

    Deleting an autotuned iterator waits for that thread to finish its current sleep, which grows
    after every tuning round, so a training stream freed when ``fit`` returns could hold a run for
    tens of seconds (benchmarks/NOTEBOOK.md). Without it, ``AUTOTUNE`` parallelism is the number of
    cores and ``prefetch`` still tunes its own buffer.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


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
    ``[1, H, 1, W * C]`` image, because its kernel, ScaleAndTranslate, is several times faster
    over many channels than over the one of a grey X-ray. The reshape copies nothing, and the
    kernel makes no float copy of the full-size image either, so a huge image costs little memory.
    """
    shape = tf.shape(image)
    flat = tf.reshape(image, [1, shape[0], 1, shape[1] * shape[2]])
    resampled = tf.image.resize(flat, (size, 1), method="bilinear", antialias=True)
    return tf.reshape(resampled, [size, shape[1], shape[2]])


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear, antialiased resize of ``[H, W, C]`` to a float square; skipped when it already has that size.

    The same separable filter as ``tf.image.resize(..., antialias=True)``, with the same pixels
    (bit-identical, as a test checks), applied one axis at a time by ``_resize_rows``: rows, then
    the columns of the already shorter image.
    """
    def resize() -> tf.Tensor:
        rows = _resize_rows(image, image_size)
        columns = _resize_rows(tf.transpose(rows, [1, 0, 2]), image_size)
        return tf.transpose(columns, [1, 0, 2])

    same = tf.reduce_all(tf.shape(image)[:2] == image_size)
    return tf.cond(same, lambda: tf.cast(image, tf.float32), resize)


# In the message of the error that ``_decode_luma`` raises, which ``why_unreadable`` puts in words.
_DATA_ENDS_EARLY = "the last rows are the grey libjpeg fills missing data with"


def _decode_luma(raw: tf.Tensor, ratio: int) -> tf.Tensor:
    """The Y channel of a grey or YCbCr JPEG at 1/``ratio`` scale; an error if its data ends before its last rows.

    When the entropy-coded data ends (at a marker) before the blocks that the header declares,
    libjpeg only warns and decodes the missing blocks as all-zero coefficients, i.e. Y = 128
    exactly, and TensorFlow returns that flat grey as if it were the image. A last block row
    (8 source rows) that is 128 everywhere is taken for it: real X-rays are never so uniformly
    mid-grey, and a tiny file whose header was made to claim 23000 rows is caught at once. (CMYK
    JPEGs, rare and decoded through a colour conversion in ``_decode_any``, are not checked.)
    """
    image = tf.io.decode_jpeg(raw, channels=1, ratio=ratio)
    last_block_row = -(-8 // ratio)  # 8 source rows, ceil(8 / ratio) decoded ones
    filled = tf.reduce_all(image[-last_block_row:] == 128)
    with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(filled), [_DATA_ENDS_EARLY])]):
        return tf.identity(image)


def _decode_grey_jpeg(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """A grey or YCbCr JPEG as its luma channel, DCT-downscaled by 2, 4 or 8 while still >= ``image_size``.

    libjpeg hands out the Y channel directly (no colour conversion) and can scale by 1/2, 1/4 or 1/8
    while decoding, which skips most of the work on a large image; the resize finishes the job.
    """
    shortest = tf.reduce_min(tf.io.extract_jpeg_shape(raw)[:2])
    # Output sides are ceil(side / ratio); take the largest ratio that keeps them >= image_size.
    branch = tf.reduce_sum(tf.cast(-(-shortest // (2, 4, 8)) >= image_size, tf.int32))
    return tf.switch_case(branch, [functools.partial(_decode_luma, raw, ratio) for ratio in (1, 2, 4, 8)])


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


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, last in every complete PNG
_SUPPORTED = "JPEG, PNG, BMP, GIF or WebP"


def decode_error_message(error: tf.errors.OpError) -> str:
    """TensorFlow's message without the op plumbing around it, e.g. 'Input is empty.'"""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.DOTALL).replace("\n", " ").strip()


def why_unreadable(path: str, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``decode_image`` fails on ``path`` or must not be tried (``image_headers.precheck``), in words;
    None if it decodes now."""
    problem = image_headers.precheck(path, max_pixels).problem
    if problem is not None:
        return problem
    try:
        decode_image(tf.constant(path), image_size)
        return None
    except tf.errors.OpError as error:
        return explain_failure(path, error)


def explain_failure(path: str, error: tf.errors.OpError) -> str:
    """``decode_image``'s ``error`` on ``path`` in words that name the format and what is wrong with the file."""
    message = decode_error_message(error)
    if _DATA_ENDS_EARLY in message:
        header = image_headers.read_header(path)
        size = f"{header.width} x {header.height}" if header else "more rows"
        return f"header declares {size} but the data ends early (truncated?)"
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - len(_PNG_END)))
            tail = handle.read()
    except OSError as read_error:
        return f"cannot be read: {read_error.strerror or message}"
    if not head:
        return "empty file (0 bytes)"
    found = image_headers.sniff_format(head)
    if found in image_headers.UNSUPPORTED_FORMATS:
        return f"{found} image: not supported, convert it to {_SUPPORTED}"
    if found == "PNG" and tail != _PNG_END:
        return "PNG file that ends early (truncated?): no IEND chunk at its end"
    if found:
        return f"{found} file that does not decode (corrupt or truncated?): {message}"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character may be cut
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"not an image but text starting {text[:40]!r}"
    return f"not an image ({message})"


def list_unreadable(unreadable: dict[str, str]) -> str:
    """``unreadable`` (path -> reason) as one indented line per file, sorted: for error messages."""
    return "\n".join(f"  {path}: {reason}" for path, reason in sorted(unreadable.items()))


def decoded_dataset(frame: pd.DataFrame, image_size: int) -> tf.data.Dataset:
    """``(uint8 image, int64 label_index)`` for each row of ``frame``, in row order, decoded as they
    stream (for one pass over files too many to hold, e.g. the dataset statistics); training and
    evaluation decode with ``image_cache.decode_images`` instead, which also reports every unreadable file."""
    paths = tf.data.Dataset.from_tensor_slices(
        (frame["path"].to_numpy(dtype=str), frame["label_index"].to_numpy(dtype=np.int64))
    )
    return without_autotune_thread(
        paths.map(lambda path, label: (decode_image(path, image_size), label), num_parallel_calls=AUTOTUNE))
