"""Byte-identical image files across datasets, so that an image given twice (CoronaHack and a Kermany copy of
it, or one folder passed twice) counts once and can never sit on both sides of a split.

Only files of equal size are read, so a check of thousands of distinct images costs one ``stat`` each.
"""

from __future__ import annotations

import hashlib
import os

import pandas as pd

_CHUNK = 1 << 20


def _size(path: str) -> int | None:
    """The file's size; None where it is missing, unreadable or empty, which the index's file check reports."""
    try:
        return os.stat(path).st_size or None
    except OSError:
        return None


def _digest(path: str) -> str | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def copies_of_earlier_sources(paths: pd.Series, sources: pd.Series) -> pd.Series:
    """Per row, the source of an earlier row (in frame order) from another source whose file has the same bytes.

    None where the file is no such copy; a copy within one source is not ours to judge (a dataset's own
    duplicates are its business), so it is None as well.
    """
    copied_from = pd.Series(None, index=paths.index, dtype=object)
    sizes = pd.Series([_size(path) for path in paths], index=paths.index)
    shared = sizes.notna() & sizes.map(sources.groupby(sizes).nunique()).gt(1)
    digests = pd.Series({row: _digest(paths[row]) for row in paths.index[shared]}, dtype=object)
    first_source: dict[str, str] = {}
    for row, digest in digests.dropna().items():
        earlier = first_source.setdefault(digest, sources[row])
        if earlier != sources[row]:
            copied_from[row] = earlier
    return copied_from
