"""The images of a pretraining run: found in folders, dataset layouts or CSV files, and decoded once.

Labels are never read into anything: a dataset layout (``xray_tf.layouts``, as ``xray-train``
reads it) contributes the paths of its images outside its test split, which stays unseen for the
classifier's final measurement; a plain folder contributes every image file under it, searched
as ``xray-predict`` searches; a CSV its ``path`` column (relative to the CSV; a ``split`` column's
test rows left out); any other file is an image itself. The paths are sorted and kept once, so
neither the labels nor the order of the rows can change a run. Decoding is training's one pass
(``image_cache.decode_images``), and every file that cannot be used is listed in one error, as
``preflight`` does for training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from xray_tf import image_cache, layouts, predict
from xray_tf.decode import list_unreadable
from xray_tf.tables import DataError, image_paths, read_csv_checked

logger = logging.getLogger(__name__)

_LEFT_OUT_SPLIT = "test"


@dataclasses.dataclass(frozen=True)
class PretrainImages:
    """The decoded images pretraining draws its views from."""

    paths: tuple[str, ...]  # sorted
    images: np.ndarray  # uint8 [M, S, S, 1] of every file decoded (skipped ones too), in memory or a cache file
    rows: np.ndarray  # rows[i]: the row of images holding paths[i]
    skipped: dict[str, str]  # path -> why it cannot be decoded (on_bad_image="skip")
    notes: tuple[str, ...]  # how each source was read, for the log
    seconds: float  # spent decoding


def _csv_paths(csv_path: str) -> tuple[list[str], list[str]]:
    """``(paths, problems)`` of a CSV's ``path`` column: relative to the CSV, test rows left out."""
    table = read_csv_checked(csv_path, ("path",))
    if "split" in table:
        table = table[table["split"].astype("string").str.strip().str.lower() != _LEFT_OUT_SPLIT]
    paths, outside = image_paths(os.path.dirname(os.path.abspath(csv_path)), table["path"])
    problems = [f"{csv_path}: {int(outside.sum())} path(s) outside its folder, never read, e.g. "
                f"{table['path'][outside].iloc[0]!r}."] if outside.any() else []
    return [path for path, out in zip(paths, outside) if not out], problems


def _layout_paths(folder: str, layout: str, why: str) -> tuple[list[str], list[str], str]:
    """``(paths, problems, note)`` of the dataset in ``folder`` read as ``layout`` (for the reason ``why``),
    outside its test split."""
    source, _ = layouts.read(folder, layout)
    frame = source.frame
    outside = frame[frame["outside"]]
    problems = [f"{folder}: its metadata names {len(outside)} file(s) outside the folder, never read, e.g. "
                f"{outside['file'].iloc[0]!r}."] if len(outside) else []
    kept = frame[~frame["outside"] & (frame["split"] != _LEFT_OUT_SPLIT)]
    note = (f"{folder}: read as the {source.layout} layout ({why}): {len(kept)} images, its "
            f"{int((frame['split'] == _LEFT_OUT_SPLIT).sum())} test images left out")
    return kept["path"].tolist(), problems, note


def _source_paths(source: str, data_format: str) -> tuple[list[str], list[str], str]:
    """``(paths, problems, note)`` of one ``--images`` value (see ``find_images``)."""
    if os.path.isfile(source) and source.lower().endswith(".csv"):
        paths, problems = _csv_paths(source)
        return paths, problems, f"{source}: {len(paths)} images listed"
    layout, why = ("images" if os.path.isfile(source) else data_format), "as asked"
    if layout == "auto":
        try:
            layout, why = layouts.detect(source)
        except DataError as error:
            layout = "images"
            logger.info("%s: every image file under it is used (%s)", source, str(error).splitlines()[0])
    if layout == "images":
        paths = predict.find_images([source])
        return paths, [], f"{source}: {len(paths)} image files found"
    return _layout_paths(source, layout, why)


def find_images(sources: Sequence[str], data_format: str = "auto") -> tuple[list[str], list[str]]:
    """``(sorted unique image paths, notes)`` of every source; one DataError lists every problem.

    ``data_format``: "auto" reads a folder as its dataset layout where ``layouts.detect`` finds one,
    else takes every image file under it; "images" always does the latter; a layout name reads
    every folder as that layout. A ``.csv`` file is a table with a ``path`` column; any other file is an image.
    """
    found, problems, notes = [], [], []
    for source in sources:
        try:
            paths, source_problems, note = _source_paths(source, data_format)
        except (DataError, ValueError, OSError) as error:
            problems.append(str(error))
            continue
        found += paths
        problems += source_problems
        notes.append(note)
    paths = sorted(set(found))
    if not paths and not problems:
        problems.append(f"No images in {', '.join(sources)}.")
    if problems:
        raise DataError("\n".join([f"{len(problems)} problem(s) with --images; nothing was pretrained:", *problems]))
    if len(paths) < len(found):
        notes.append(f"{len(found) - len(paths)} path(s) named twice are used once")
    return paths, notes


def load_images(sources: Sequence[str], image_size: int, data_format: str = "auto", on_bad_image: str = "error",
                cache: str = "memory", max_pixels: int | None = None) -> PretrainImages:
    """Find and decode every image of ``sources`` once; unusable files are an error or skipped (``on_bad_image``)."""
    paths, notes = find_images(sources, data_format)
    for note in notes:
        logger.info("%s", note)
    limits = {} if max_pixels is None else {"max_pixels": max_pixels}
    decoded = image_cache.decode_images(paths, image_size, cache, **limits)
    unreadable = decoded.unreadable
    if unreadable and on_bad_image == "error":
        raise DataError(f"{len(unreadable)} image file(s) cannot be used (--on_bad_image=skip pretrains without "
                        f"them); nothing was pretrained:\n{list_unreadable(unreadable)}")
    kept = [path for path in paths if path not in unreadable]
    if unreadable:
        logger.warning("Skipping %d image file(s) that cannot be used (--on_bad_image=skip):\n%s",
                       len(unreadable), list_unreadable(unreadable))
    if not kept:
        raise DataError(f"None of the {len(paths)} image files can be used; nothing was pretrained.")
    return PretrainImages(tuple(kept), decoded.images, decoded.rows(kept), dict(unreadable), tuple(notes),
                          decoded.seconds)
