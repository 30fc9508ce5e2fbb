"""The data index: one or more datasets, in any of ``xray_tf.layouts``, -> one pandas row per image, with
class, split, source and patient.

Everything that can be wrong with a dataset (a missing file, a label we cannot place, a class
with no training images) is found here, before TensorFlow touches a single pixel, and reported
in one error listing the offending rows.

Classes: data labelled with the fine classes (CoronaHack, Kermany, the metadata layout) is mapped
by the task (``config.TASKS``); ``Stress-Smoking`` (ARDS) belongs to no class and is excluded, as
are rows outside the task's classes. Folders and CSV data bring their own labels, which
``--class_names`` may map and order. Everything left out is counted, so the log says what.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection, Sequence

import pandas as pd

from xray_tf import copies, image_headers, layouts, patients
from xray_tf.config import SPLIT_BY, TASKS, ConfigError, class_name_map
from xray_tf.layouts import EXCLUDED_CATEGORY
from xray_tf.tables import DataError, describe_rows

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXTRA_SOURCE = "extra"  # the source of --extra_data images, which join train only
_INDEX_COLUMNS = ["path", "file", "label", "label_index", "split", "source", "patient"]


@dataclasses.dataclass(frozen=True)
class DataIndex:
    """All images of one task: ``frame`` has columns path, file, label, label_index, split, source, patient."""

    frame: pd.DataFrame
    class_names: tuple[str, ...]
    excluded: dict[str, int]  # reason -> number of rows left out
    problems: tuple[str, ...] = ()  # what is wrong with the metadata (load_index(strict=False)), one paragraph each
    sources: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # name -> layout, location
    absent_classes: tuple[str, ...] = ()  # the task's classes that no dataset given can hold (Kermany: COVID-19)
    notes: tuple[str, ...] = ()  # how the datasets were read, for the log

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def class_counts(self, split: str) -> dict[str, int]:
        counts = self.split(split)["label"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.class_names}

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Images per source and class (every split), for ``metrics.json``."""
        counts = self.frame.groupby(["source", "label"]).size()
        return {source: {name: int(counts.get((source, name), 0)) for name in self.class_names}
                for source in self.sources}

    def require_training_images(self, where: str) -> None:
        """Raise DataError if a class has no training image: it could be neither learnt nor weighted."""
        empty = [name for name, count in self.class_counts("train").items() if count == 0]
        if empty:
            raise DataError(f"{where} has no training images of class(es) {', '.join(empty)}.")

    def without(self, paths: Collection[str], reason: str) -> DataIndex:
        """This index minus the rows of ``paths``, counted under ``reason`` in ``excluded``."""
        dropped = self.frame["path"].isin(list(paths))
        index = dataclasses.replace(self, frame=self.frame[~dropped].reset_index(drop=True),
                                    excluded={**self.excluded, reason: int(dropped.sum())})
        index.require_training_images(f"Without the {int(dropped.sum())} image(s) {reason}, the dataset")
        return index

    def patient_count(self, split: str) -> int:
        """Patients (groups of images of one patient; an image without an id is its own) in ``split``."""
        return int(self.split(split)["patient"].nunique())

    def summary(self) -> str:
        lines = [
            f"{split:>5}: {len(self.split(split)):5d} images of {self.patient_count(split):5d} patients  "
            + ", ".join(f"{k}={v}" for k, v in self.class_counts(split).items())
            for split in SPLITS
        ]
        if len(self.sources) > 1:
            lines += [f"source {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
                      for name, counts in self.source_counts().items()]
        lines += [f"excluded: {count} rows ({reason})" for reason, count in self.excluded.items()]
        lines += [f"absent: {name} (no dataset given can hold it; the model has {len(self.class_names)} classes)"
                  for name in self.absent_classes]
        return "\n".join(lines)


def class_names_for(task: str) -> tuple[str, ...]:
    """The task's class names in a fixed order (the order of the model's outputs)."""
    if task not in TASKS:
        raise ConfigError("task", task, f"not one of {', '.join(TASKS)}.")
    return tuple(dict.fromkeys(TASKS[task].values()))


def _missing_files(frame: pd.DataFrame) -> list[str]:
    """The rows whose image is no regular readable file, as one paragraph (or none), without opening any."""
    problem = pd.Series([None if outside else image_headers.file_problem(path)  # outside: never looked at
                         for path, outside in zip(frame["path"], frame["outside"])], index=frame.index, dtype=object)
    missing = frame.assign(problem=problem)[problem.notna()]
    if missing.empty:
        return []
    return [f"{len(missing)} row(s) whose image file cannot be used:\n" + describe_rows(missing, ["path", "problem"])]


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise DataError("\n".join(problems))


def _read_sources(folders: Sequence[str], data_format: str, data_csv: str | None,
                  extra_data: str | None) -> tuple[list[tuple[str, layouts.Source]], list[str]]:
    """``([(source name, source)], notes)`` in the order given; every folder's layout error is raised at once."""
    wanted = [(folder, data_format) for folder in folders] + [(extra_data, "auto")] * bool(extra_data)
    read, errors, notes = [], [], []
    for folder, layout in wanted:
        try:
            source, why = layouts.read(folder, layout)
        except DataError as error:
            errors.append(str(error))
            continue
        read.append(source)
        notes.append(f"{folder}: read as {source.layout} ({why}).")
    if data_csv:
        try:
            read.insert(len(folders), layouts.read_csv_file(data_csv))
        except DataError as error:
            errors.append(str(error))
    _raise_problems(errors)
    named, seen = [], {}
    for position, source in enumerate(read):  # named by layout: coronahack, kermany, kermany-2, ...
        base = EXTRA_SOURCE if extra_data and position == len(read) - 1 else source.layout
        seen[base] = seen.get(base, 0) + 1
        named.append((base if seen[base] == 1 else f"{base}-{seen[base]}", source))
        notes += source.notes
    return named, notes


def _combined(named: list[tuple[str, layouts.Source]]) -> tuple[pd.DataFrame, list[str], dict[str, int], list[str]]:
    """One frame of every source's rows (``source``, ``fine_labels``), byte-identical copies after the first dropped."""
    frame = pd.concat([source.frame.assign(source=name, fine_labels=source.fine_labels) for name, source in named],
                      ignore_index=True)
    problems = [problem for _, source in named for problem in source.problems]
    excluded: dict[str, int] = {}
    for _, source in named:
        for reason, count in source.excluded.items():
            excluded[reason] = excluded.get(reason, 0) + count
    notes = []
    if len(named) > 1:
        copied_from = copies.copies_of_earlier_sources(frame["path"].where(~frame["outside"], ""), frame["source"])
        for (source, earlier), rows in frame[copied_from.notna()].groupby([frame["source"], copied_from]):
            excluded[f"byte-identical copy of an image of {earlier}, counted once"] = len(rows)
            notes.append(f"{len(rows)} image(s) of {source} are byte-identical copies of images of {earlier}, each "
                         f"kept once (as {earlier}'s):\n" + describe_rows(rows, ["path"]))
        frame = frame[copied_from.isna()]
    return frame, problems, excluded, notes


def _classes(frame: pd.DataFrame, task: str, class_names: str | None, holds: set[str],
             fixed: Sequence[str] | None) -> tuple[pd.DataFrame, tuple[str, ...], dict[str, int], tuple[str, ...]]:
    """``(rows of the classes with label and label_index, class names, rows left out by reason, absent classes)``.

    Fine labels go through the task, then every label through ``class_names``; ``fixed`` (a trained
    run's classes) leaves out what is not one of them instead of deriving the classes from the data.
    """
    task_classes, task_map = class_names_for(task), TASKS[task]
    fine, label = frame["fine_labels"].astype(bool), frame["label"]
    excluded, keep = {}, label.notna() & ~frame["outside"]
    not_a_class = fine & (label == EXCLUDED_CATEGORY)
    if not_a_class.any():
        excluded[f"{EXCLUDED_CATEGORY}, in no class"] = int(not_a_class.sum())
    outside_task = fine & keep & ~not_a_class & ~label.isin(list(task_map))
    for name, count in label[outside_task].value_counts().items():
        excluded[f"{name}, not in task {task}"] = int(count)
    label = label.where(~fine, label.map(task_map))
    keep &= label.notna()
    absent: tuple[str, ...] = ()
    if class_names:
        mapping = class_name_map(class_names)
        for name, count in label[keep & ~label.isin(list(mapping))].value_counts().items():
            excluded[f"{name}, not in --class_names"] = int(count)
        label = label.map(mapping)
        names = tuple(dict.fromkeys(mapping.values()))
    else:
        own = set(label[keep & ~fine])
        possible = [name for name in task_classes if any(task_map.get(f) == name for f in holds)] if fine.any() else []
        names = tuple(name for name in task_classes if name in possible or name in own)
        names += tuple(sorted(own - set(names)))
        absent = tuple(name for name in task_classes if fine.any() and name not in names)
    if fixed is not None:
        for name, count in label[keep & label.notna() & ~label.isin(list(fixed))].value_counts().items():
            excluded[f"{name}, not a class of the run"] = int(count)
        names, absent = tuple(fixed), ()
    keep &= label.isin(list(names))
    frame = frame[keep].assign(label=label[keep])
    frame["label_index"] = frame["label"].map({name: i for i, name in enumerate(names)}).astype("int64")
    return frame, names, excluded, absent


def _patient_groups(frame: pd.DataFrame) -> pd.Series:
    """Each row's patient group (``patients.patient_ids``): a given id, else read from the file name."""
    # TEST's file names number their patients afresh (Kermany's test cohort), so its ids are its own.
    prefix = frame["source"].where(frame["split"] != "test", frame["source"] + "-test")
    groups = pd.Series(index=frame.index, dtype=object)
    for source, rows in frame.groupby(prefix):
        groups[rows.index] = patients.patient_ids(rows["file"], source, rows["patient_id"])
    return groups


def _index(folders: Sequence[str], task: str, data_format: str, data_csv: str | None, class_names: str | None,
           extra_data: str | None = None, fixed: Sequence[str] | None = None) -> tuple[pd.DataFrame, DataIndex]:
    """``(rows with outside and duplicate paths, the index without split carving)`` of every dataset given."""
    if not folders and not data_csv:
        raise ConfigError("data_dir", None, "no dataset given: name a folder (or a CSV with --data_csv).")
    class_names_for(task)  # the task's name is checked before any file is read
    named, notes = _read_sources(folders, data_format, data_csv, extra_data)
    frame, problems, excluded, copy_notes = _combined(named)
    holds = {fine for _, source in named if source.fine_labels for fine in source.holds}
    frame, names, left_out, absent = _classes(frame, task, class_names, holds, fixed)
    frame = frame.assign(patient=_patient_groups(frame))
    index = DataIndex(frame=frame, class_names=names, excluded={**excluded, **left_out}, problems=tuple(problems),
                      sources={name: {"layout": source.layout, "location": os.path.abspath(source.location)}
                               for name, source in named},
                      absent_classes=absent, notes=tuple(notes + copy_notes))
    return frame, index


def load_index(
    data_dir: str | os.PathLike | Sequence[str | os.PathLike],
    task: str = "four_class",
    val_fraction: float = 0.1,
    seed: int = 0,
    extra_data: str | None = None,
    strict: bool = True,
    split_by: str = "patient",
    *,
    data_format: str = "auto",
    data_csv: str | None = None,
    class_names: str | None = None,
) -> DataIndex:
    """Read every dataset given and return the task's images with their class, split, source and patient.

    ``data_dir`` is one folder or several, each read as ``data_format`` (``auto``: detected);
    ``data_csv`` adds a CSV of paths and labels. A dataset without its own val split has one
    carved from its train split, stratified by class and seeded: by patient (``split_by``
    "patient": all of a patient's images on one side, ``patients.grouped_split``) or image by
    image. ``extra_data`` images join train only (never val or test), so their patients cannot
    leak into validation. Every problem with the metadata is collected; ``strict`` raises them,
    with the rows whose file is missing, as one DataError, while ``strict=False`` returns them in
    ``problems`` for a caller that checks the image files itself (training's one report of everything).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "must be strictly between 0 and 1.")
    if split_by not in SPLIT_BY:
        raise ConfigError("split_by", split_by, f"not one of {', '.join(SPLIT_BY)}.")
    folders = [os.fspath(data_dir)] if isinstance(data_dir, (str, os.PathLike)) else list(map(os.fspath, data_dir))
    frame, index = _index(folders, task, data_format, data_csv, class_names, extra_data)
    frame = frame.drop_duplicates("path")  # reported as a problem; an image counts once in a split
    frame.loc[frame["source"] == EXTRA_SOURCE, "split"] = "train"  # whatever splits its own layout has
    with_val = set(frame.loc[frame["split"] == "val", "source"])
    pool = (frame["split"] == "train") & (frame["source"] != EXTRA_SOURCE) & ~frame["source"].isin(with_val)
    train = frame[pool]
    groups = train["patient"] if split_by == "patient" else train["path"]  # image by image: each its own group
    if len(train):
        frame.loc[pool, "split"] = patients.grouped_split(train["label"], groups, train["file"], val_fraction, seed)
    index = dataclasses.replace(index, frame=frame[_INDEX_COLUMNS].reset_index(drop=True))
    if strict:
        _raise_problems(list(index.problems) + _missing_files(frame))
    empty = [name for name, count in index.class_counts("train").items() if count == 0]
    if empty:
        where = folders[0] if len(folders) == 1 and not data_csv else "the datasets given"
        message = f"{where}: task {task!r} has no training images of class(es) {', '.join(empty)}."
        if strict:
            raise DataError(message)
        index = dataclasses.replace(index, problems=(*index.problems, message))
    return index


def load_folder_index(folder: str, task: str = "four_class", class_names: Sequence[str] | None = None,
                      class_map: str | None = None) -> DataIndex:
    """A dataset in any layout as an index whose every image is in split "eval".

    For ``xray-evaluate --eval_data``: a hospital's own set, or the paper's extra COVID-19 images.
    ``class_names`` (a trained run's) fixes the classes, so that labels outside them are left out
    and counted; classes absent from the folder simply have no images (``class_counts`` says 0).
    ``class_map`` is the run's ``--class_names``.
    """
    frame, index = _index([folder], task, "auto", None, class_map, fixed=class_names)
    _raise_problems(list(index.problems) + _missing_files(frame))
    if frame.empty:
        raise DataError(f"{folder}: no image of the classes {', '.join(index.class_names)}.")
    frame = frame.drop_duplicates("path").assign(split="eval")
    return dataclasses.replace(index, frame=frame[_INDEX_COLUMNS].reset_index(drop=True))
