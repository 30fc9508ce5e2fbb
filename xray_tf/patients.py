"""Patient groups from file names, and a validation split that never divides a group.

CoronaHack carries no patient column, but its file names do: measured on the 5,279 TRAIN rows,
5,216 (98.8 %) name a patient, in three patterns (Kermany et al. 2018):

* ``person402_bacteria_1811.jpeg`` (and one ``person447_virus_921_1.jpeg``): child 402. The same
  number appears with ``bacteria`` and ``virus`` (808 of 1,635 numbers); both kinds go to one
  group. Images of one number and kind are clearly more alike than chance (32 px correlation: the
  partner is among the closest 1 % of images for 11 % of pairs, 1 % of random pairs), across kinds
  no more than images of neighbouring numbers (2 % either way), so the data do not show that they are the same child,
  but joining them can only prevent a leak while costing the stratification little.
* ``IM-0716-0001.jpeg`` (``IM-0439-0001-0002.jpeg``): series 0716 of a Normal child.
* ``NORMAL2-IM-1026-0001.jpeg``: series 1026 of a second export. Its numbers restart (211 series
  numbers occur with and without the prefix, both as ``-0001``, which is why the prefix exists)
  and the 211 such pairs look no more alike than random pairs, so they are separate ids.

The 63 other names (adult images of the Cohen collection, 51 of them COVID-19) name at best a
publication's figure: panels and days of one figure (``...-day0`` ... ``-day3``, ``...-l-a``/``-l-b``,
``...g09a-Fig9a``) are one patient's course, so they share a group; a name with no such suffix
is a group of its own. That gives 1,635 + 518 + 693 + 49 = 2,895 groups.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from xray_tf.config import ConfigError

# Kermany's names: the id is the person or the series; image numbers and ``_1`` copies are not.
_PERSON = r"(?P<person>person\d+)_(?:bacteria|virus)_\d+(?:_\d+)?"
_SERIES = r"(?P<series>(?:NORMAL2-)?IM-\d{4})-\d{4}(?:-\d{4})?"
_NAMED = rf"^(?:{_PERSON}|{_SERIES})\.(?:jpe?g|png)$"  # Kermany names JPEGs; a converted copy may hold PNGs
# Suffixes that tell panels or days of one publication figure apart.
_EXTENSION = r"\.(?:jpe?g|png)$"
_DAY = r"[-_]day\d+$"
_PANEL_LETTERS = r"(?:-[a-z]\d?)+$"  # "-a", "-b2", "-l-a": the last tokens
_FIGURE_LETTER = r"((?:fig|g)\d+)[a-z](?=[-_.]|$)"  # "g09a", "Fig9a": figure 9, panel a


def patient_ids(file_names: pd.Series, source: str = "coronahack", given: pd.Series | None = None) -> pd.Series:
    """One group id per image, ``"<source>:<id>"``, same index; never NaN.

    ``given`` holds ids from a metadata column (``patient_id``, or ``patientid`` in the Cohen
    collection): where present they win, as ``"<source>:patient:<value>"``. Elsewhere the id comes
    from the file name (module docstring): ``person402``, ``IM-0716``, ``NORMAL2-IM-1026``, or
    ``file:<name less panel and day suffixes>``. The ``source`` prefix keeps ids of different
    metadata files apart: their numbering is their own.
    """
    names = file_names.astype(str).str.strip()
    named = names.str.extract(_NAMED)
    figure = (
        names.str.replace(_EXTENSION, "", regex=True, case=False)
        .str.replace(_DAY, "", regex=True, case=False)
        .str.replace(_PANEL_LETTERS, "", regex=True, case=False)
        .str.replace(_FIGURE_LETTER, r"\1", regex=True, case=False)
    )
    ids = named["person"].fillna(named["series"]).fillna("file:" + figure)
    if given is not None:
        if not given.index.equals(file_names.index):
            raise ConfigError("given", f"{len(given)} rows", "must have the same index as file_names.")
        given_ids = given.astype("string").str.strip().replace("", pd.NA)
        ids = ("patient:" + given_ids).fillna(ids)
    return (source + ":" + ids).astype(object)


def _val_targets(counts: np.ndarray, val_fraction: float) -> np.ndarray:
    """``round(n * val_fraction)`` images per class, at least one where the class has two."""
    targets = np.rint(counts * val_fraction).astype(int)
    return np.where(counts >= 2, np.clip(targets, 1, counts - 1), 0)


def grouped_split(
    labels: pd.Series, groups: pd.Series, files: pd.Series, val_fraction: float, seed: int
) -> pd.Series:
    """Mark whole groups "val", the rest "train", so that each class gets about its stratified share.

    Per class the target is what an image-level stratified split would take: ``round(n *
    val_fraction)``, at least one image where the class has two. Groups are visited in a seeded
    order and each joins val if none of its classes would pass its target; since most groups are
    one or two images, the targets are met exactly, or nearly, without ever being overshot. A group
    with images of several classes counts each image to its own class, rather than going by one
    class. A class that has no val image after that pass (every group of it too big for its
    target) gets its smallest group, unless that group holds the last training image of a class.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "must be strictly between 0 and 1.")
    for name, series in (("groups", groups), ("files", files)):
        if not series.index.equals(labels.index):
            raise ConfigError(name, f"{len(series)} rows", "must have the same index as labels.")
        if series.isna().any():
            raise ConfigError(name, f"{int(series.isna().sum())} missing", "every image needs a value.")
    if files.duplicated().any():
        raise ConfigError("files", f"{int(files.duplicated().sum())} repeated", "an image counts once.")
    frame = pd.DataFrame({"group": groups.astype(str), "label": labels.astype(str), "file": files.astype(str)})
    # Groups are visited in a seeded permutation of the order of their first file names: the split
    # depends on the seed and the files, not on the row order or on how the ids are spelled.
    by_first_file = frame.groupby("group")["file"].min().sort_values().index
    group_codes = pd.Categorical(frame["group"], categories=by_first_file).codes
    class_codes, _ = pd.factorize(frame["label"], sort=True)
    counts = np.zeros((len(by_first_file), class_codes.max() + 1), dtype=int)
    np.add.at(counts, (group_codes, class_codes), 1)
    class_totals = counts.sum(axis=0)
    targets = _val_targets(class_totals, val_fraction)
    room = class_totals - 1  # for the second pass: val may take all but one image of each class

    in_val = np.zeros(len(counts), dtype=bool)
    val = np.zeros_like(class_totals)
    for group in np.random.default_rng(seed).permutation(len(counts)):
        if np.all(val + counts[group] <= targets):
            in_val[group] = True
            val += counts[group]
    sizes = counts.sum(axis=1)
    for label in np.flatnonzero((val == 0) & (targets > 0)):
        fits = (counts[:, label] > 0) & ~in_val & np.all(val + counts <= room, axis=1)
        if fits.any():
            smallest = np.flatnonzero(fits)[np.argmin(sizes[fits])]  # ties: the group with the first file
            in_val[smallest] = True
            val += counts[smallest]

    return pd.Series(np.where(in_val[group_codes], "val", "train"), index=labels.index, dtype="object")
