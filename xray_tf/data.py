"""The data index: CoronaHack metadata CSV -> one pandas row per image, with class and split.

Everything that can be wrong with a dataset (a missing file, a label we cannot place, a class
with no training images) is found here, before TensorFlow touches a single pixel, and reported
in one error listing the offending rows.

Class rules (see the dataset README): ``Label == Normal`` is Normal; ``Label_2_Virus_category ==
COVID-19`` is COVID-19; otherwise ``Label_1_Virus_category`` ``bacteria`` is Bacteria and ``Virus``
is Virus. ``Stress-Smoking`` (ARDS) belongs to no class and is excluded, as are rows outside the
chosen task's classes; both are counted so the log says what was left out.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from xray_tf import image_headers, patients
from xray_tf.config import FINE_CLASSES, SPLIT_BY, TASKS, ConfigError

METADATA_CSV = "Chest_xray_Corona_Metadata.csv"
IMAGE_FOLDER = "Coronahack-Chest-XRay-Dataset"
EXCLUDED_CATEGORY = "Stress-Smoking"

SPLITS = ("train", "val", "test")
_REQUIRED_COLUMNS = (
    "X_ray_image_name",
    "Label",
    "Dataset_type",
    "Label_1_Virus_category",
    "Label_2_Virus_category",
)
_ROWS_SHOWN = 5
_SNIFFED_BYTES = 8192  # enough of a file to tell a binary one from text
EXTRA_METADATA = "metadata.csv"  # of an --extra_data or --eval_data folder, beside images/
EXTRA_IMAGES = "images"


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the file and the rows."""


@dataclasses.dataclass(frozen=True)
class DataIndex:
    """All images of one task: ``frame`` has columns path, file, label, label_index, split, source, patient."""

    frame: pd.DataFrame
    class_names: tuple[str, ...]
    excluded: dict[str, int]  # reason -> number of rows left out
    problems: tuple[str, ...] = ()  # what is wrong with the metadata (load_index(strict=False)), one paragraph each

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def class_counts(self, split: str) -> dict[str, int]:
        counts = self.split(split)["label"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.class_names}

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
        lines += [f"excluded: {count} rows ({reason})" for reason, count in self.excluded.items()]
        return "\n".join(lines)


def class_names_for(task: str) -> tuple[str, ...]:
    """The task's class names in a fixed order (the order of the model's outputs)."""
    if task not in TASKS:
        raise ConfigError("task", task, f"not one of {', '.join(TASKS)}.")
    return tuple(dict.fromkeys(TASKS[task].values()))


def _describe_rows(frame: pd.DataFrame, columns: list[str]) -> str:
    shown = frame.head(_ROWS_SHOWN)
    rows = [f"  row {i}: " + ", ".join(f"{c}={row[c]!r}" for c in columns) for i, row in shown.iterrows()]
    more = len(frame) - len(shown)
    return "\n".join(rows + ([f"  ... and {more} more"] if more > 0 else []))


def locate_dataset(data_dir: str) -> tuple[str, str]:
    """Return ``(csv_path, image_root)`` for the Kaggle layout, nested twice or once.

    ``image_root`` holds the ``train/`` and ``test/`` folders.
    """
    csv_path = os.path.join(data_dir, METADATA_CSV)
    if not os.path.isfile(csv_path):
        raise DataError(f"{data_dir}: no {METADATA_CSV} there (the Kaggle CoronaHack layout).")
    candidates = [
        os.path.join(data_dir, IMAGE_FOLDER, IMAGE_FOLDER),
        os.path.join(data_dir, IMAGE_FOLDER),
    ]
    for root in candidates:
        if os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "test")):
            return csv_path, root
    raise DataError(
        f"{data_dir}: found {METADATA_CSV} but no image folders; expected "
        f"{candidates[0]}/train (or {candidates[1]}/train)."
    )


def fine_classes(metadata: pd.DataFrame) -> pd.Series:
    """Per row: one of FINE_CLASSES, EXCLUDED_CATEGORY, or NaN when the labels make no sense."""
    label = metadata["Label"].astype("string").str.strip().str.lower()
    category_1 = metadata["Label_1_Virus_category"].astype("string").str.strip().str.lower()
    category_2 = metadata["Label_2_Virus_category"].astype("string").str.strip().str.lower()
    pneumonia = label.isin(["pnemonia", "pneumonia"])  # the CSV spells it "Pnemonia"
    conditions = [
        (label == "normal") & category_1.isna() & category_2.isna(),
        pneumonia & (category_2 == "covid-19"),
        pneumonia & (category_1 == "bacteria"),
        pneumonia & (category_1 == "virus"),
        pneumonia & (category_1 == EXCLUDED_CATEGORY.lower()),
    ]
    choices = ["Normal", "COVID-19", "Bacteria", "Virus", EXCLUDED_CATEGORY]
    conditions = [c.fillna(False).to_numpy(dtype=bool) for c in conditions]
    return pd.Series(np.select(conditions, choices, default=None), index=metadata.index, dtype="object")


def read_csv_checked(
    csv_path: str, required: Sequence[str], error: type[ValueError] = DataError, rows: str = "rows"
) -> pd.DataFrame:
    """Read a CSV that must exist, be UTF-8 text, have the ``required`` columns and at least one row.

    Every failure raises ``error`` with a message naming the file (and the line, where the parser
    knows it) rather than pandas' own words; ``rows`` is what a row is called in the message ("no
    epochs" for a history file).
    """
    if not os.path.isfile(csv_path):
        what = "no such file" if not os.path.lexists(csv_path) else "not a regular file"
        raise error(f"{csv_path}: {what}.")
    try:
        with open(csv_path, "rb") as handle:
            head = handle.read(_SNIFFED_BYTES)
        if b"\0" in head:
            raise error(f"{csv_path}: a binary file (it holds NUL bytes), not a CSV table.")
        frame = pd.read_csv(csv_path, encoding="utf-8")
    except OSError as problem:
        raise error(f"{csv_path}: cannot be read ({problem.strerror}).") from None
    except UnicodeDecodeError as problem:
        raise error(f"{csv_path}: not UTF-8 text (byte {problem.object[problem.start]:#04x} at byte offset "
                    f"{problem.start} of its block); save it as UTF-8.") from None
    except pd.errors.EmptyDataError:
        raise error(f"{csv_path}: the file is empty.") from None
    except pd.errors.ParserError as problem:
        where = re.search(r"line (\d+)", str(problem))
        detail = re.sub(r"^Error tokenizing data\. C error: ", "", str(problem)).strip()
        raise error(f"{csv_path}{f', line {where.group(1)}' if where else ''}: not a well-formed CSV table "
                    f"({detail}).") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise error(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}.")
    if frame.empty:
        raise error(f"{csv_path}: no {rows}.")
    return frame


def image_paths(folder: str, names: pd.Series) -> tuple[list[str], pd.Series]:
    """``(path of each name inside folder, which names would leave it)``.

    A metadata file names images relative to its folder; an absolute name or one whose ``..``
    climbs out is never read, so a hostile CSV cannot make the tools open (or quote) other files.
    """
    root = os.path.normpath(os.path.abspath(folder))
    paths = [os.path.normpath(os.path.join(root, str(name))) for name in names]
    outside = [os.path.isabs(str(name)) or os.path.commonpath([root, path]) != root or path == root
               for name, path in zip(names, paths)]
    return paths, pd.Series(outside, index=names.index)


def _row_problems(frame: pd.DataFrame, csv_path: str, label_columns: list[str]) -> list[str]:
    """Every unknown label, duplicate and path outside its folder in ``frame``, one paragraph each."""
    problems = []
    unknown = frame[frame["fine_class"].isna()]
    if len(unknown):
        problems.append(
            f"{csv_path}: {len(unknown)} row(s) with labels that match no class rule:\n"
            + _describe_rows(unknown, ["X_ray_image_name", *label_columns])
        )
    duplicated = frame[frame.duplicated("path", keep=False) & ~frame["outside"]]
    if len(duplicated):
        problems.append(
            f"{csv_path}: {len(duplicated)} row(s) naming the same image more than once:\n"
            + _describe_rows(duplicated, ["X_ray_image_name", "split"])
        )
    outside = frame[frame["outside"]]
    if len(outside):
        problems.append(
            f"{csv_path}: {len(outside)} row(s) naming a file outside the image folder (absolute, or climbing "
            f"out with ..); such files are never read:\n" + _describe_rows(outside, ["X_ray_image_name"])
        )
    return problems


def _missing_files(frame: pd.DataFrame) -> list[str]:
    """The rows whose image is no regular readable file, as one paragraph (or none), without opening any."""
    problem = pd.Series([None if outside else image_headers.file_problem(path)  # outside: never looked at
                         for path, outside in zip(frame["path"], frame["outside"])], index=frame.index, dtype=object)
    missing = frame.assign(problem=problem)[problem.notna()]
    if missing.empty:
        return []
    return [f"{len(missing)} row(s) whose image file cannot be used:\n"
            + _describe_rows(missing, ["path", "problem"])]


def _read_labelled_folder(folder: str, what: str, split: str, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Rows of a folder in the extra-data layout (``metadata.csv``: X_ray_image_name, Label; ``images/``).

    ``what`` names the folder's role in messages (``--extra_data``); every row gets ``split`` and ``source``.
    """
    csv_path = os.path.join(folder, EXTRA_METADATA)
    if not os.path.isfile(csv_path):
        raise DataError(f"{folder} ({what}): no {EXTRA_METADATA} there (columns X_ray_image_name,Label, with the "
                        f"images in {EXTRA_IMAGES}/).")
    rows = read_csv_checked(csv_path, ("X_ray_image_name", "Label"))
    paths, outside = image_paths(os.path.join(folder, EXTRA_IMAGES), rows["X_ray_image_name"])
    rows = rows.assign(path=paths, outside=outside, fine_class=rows["Label"].where(rows["Label"].isin(FINE_CLASSES)),
                       split=split, source=source)
    return rows, _row_problems(rows, csv_path, ["Label"])


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise DataError("\n".join(problems))


def _task_rows(frame: pd.DataFrame, task: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of ``task``'s classes, with label and label_index, and the count of each kind left out."""
    class_names, task_map = class_names_for(task), TASKS[task]
    excluded = {}
    not_a_class = frame["fine_class"] == EXCLUDED_CATEGORY
    if not_a_class.any():
        excluded[f"{EXCLUDED_CATEGORY}, in no class"] = int(not_a_class.sum())
    outside_task = ~frame["fine_class"].isin(list(task_map)) & ~not_a_class & frame["fine_class"].notna()
    for fine, count in frame.loc[outside_task, "fine_class"].value_counts().items():
        excluded[f"{fine}, not in task {task}"] = int(count)
    frame = frame[frame["fine_class"].isin(list(task_map)) & ~frame["outside"]].copy()
    frame["label"] = frame["fine_class"].map(task_map)
    frame["label_index"] = frame["label"].map({name: i for i, name in enumerate(class_names)}).astype("int64")
    frame["file"] = frame["X_ray_image_name"].astype(str)
    frame["patient"] = _patient_groups(frame)
    return frame, excluded


def _patient_groups(frame: pd.DataFrame) -> pd.Series:
    """Each row's patient group (``patients.patient_ids``), from a patient id column where a metadata file has one."""
    given = None
    for column in ("patient_id", "patientid"):  # ours, and the Cohen collection's spelling
        if column in frame:
            given = frame[column] if given is None else given.fillna(frame[column])
    # TEST's file names number their patients afresh (Kermany's test cohort), so its ids are its own.
    prefix = frame["source"].where(frame["split"] != "test", frame["source"] + "-test")
    groups = pd.Series(index=frame.index, dtype=object)
    for source, rows in frame.groupby(prefix):
        groups[rows.index] = patients.patient_ids(rows["file"], source, None if given is None else given[rows.index])
    return groups


_INDEX_COLUMNS = ["path", "file", "label", "label_index", "split", "source", "patient"]


def load_index(
    data_dir: str,
    task: str = "four_class",
    val_fraction: float = 0.1,
    seed: int = 0,
    extra_data: str | None = None,
    strict: bool = True,
    split_by: str = "patient",
) -> DataIndex:
    """Read the CoronaHack metadata and return the task's images with their class, split and patient.

    TRAIN rows are split into train/val, stratified by class and seeded: by patient (``split_by``
    "patient": all of a patient's images on one side, ``patients.grouped_split``) or image by
    image. TEST rows, when present, become "test". ``extra_data`` images join train only (never
    val or test), so their patients cannot leak into validation. Every problem with the
    metadata is collected; ``strict`` raises them, with the rows whose file is missing, as one
    DataError, while ``strict=False`` returns them in ``problems`` for a caller that checks the
    image files itself (training's one report of everything).
    """
    class_names = class_names_for(task)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "must be strictly between 0 and 1.")
    if split_by not in SPLIT_BY:
        raise ConfigError("split_by", split_by, f"not one of {', '.join(SPLIT_BY)}.")
    csv_path, image_root = locate_dataset(data_dir)
    metadata = read_csv_checked(csv_path, _REQUIRED_COLUMNS)

    dataset_type = metadata["Dataset_type"].astype("string").str.strip().str.upper()
    known_type = dataset_type.isin(["TRAIN", "TEST"]).fillna(False).astype(bool)
    problems = []
    if not known_type.all():
        problems.append(f"{csv_path}: {int((~known_type).sum())} row(s) with Dataset_type other than TRAIN/TEST:\n"
                        + _describe_rows(metadata[~known_type], ["X_ray_image_name", "Dataset_type"]))
    folder = dataset_type.str.lower().where(known_type, "train")
    paths, outside = [], []
    for name in ("train", "test"):
        in_folder = folder == name
        folder_paths, folder_outside = image_paths(os.path.join(image_root, name), metadata.loc[in_folder,
                                                                                                "X_ray_image_name"])
        paths.append(pd.Series(folder_paths, index=folder_outside.index))
        outside.append(folder_outside)
    metadata = metadata.assign(
        path=pd.concat(paths), outside=pd.concat(outside),
        fine_class=fine_classes(metadata).where(known_type),
        split=np.where(folder == "test", "test", "train"),
        source="coronahack",
    )
    problems += _row_problems(metadata[known_type], csv_path, list(_REQUIRED_COLUMNS[1:]))
    frames = [metadata[known_type]]
    if extra_data:
        extra, extra_problems = _read_labelled_folder(extra_data, "--extra_data", "train", "extra")
        frames.append(extra)
        problems += extra_problems
    frame, excluded = _task_rows(pd.concat(frames, ignore_index=True), task)
    frame = frame.drop_duplicates("path")  # reported above; an image counts once in a split
    organizer_train = (frame["split"] == "train") & (frame["source"] == "coronahack")
    train = frame[organizer_train]
    groups = train["patient"] if split_by == "patient" else train["path"]  # image by image: each its own group
    frame.loc[organizer_train, "split"] = patients.grouped_split(train["label"], groups, train["file"], val_fraction,
                                                                 seed)
    index = DataIndex(frame=frame[_INDEX_COLUMNS].reset_index(drop=True), class_names=class_names,
                      excluded=excluded, problems=tuple(problems))
    if strict:
        _raise_problems(problems + _missing_files(frame))
    empty = [name for name, count in index.class_counts("train").items() if count == 0]
    if empty:
        message = f"{csv_path}: task {task!r} has no training images of class(es) {', '.join(empty)}."
        if strict:
            raise DataError(message)
        index = dataclasses.replace(index, problems=(*index.problems, message))
    return index


def load_folder_index(folder: str, task: str = "four_class") -> DataIndex:
    """A labelled folder in the extra-data layout as an index whose every image is in split "eval".

    For ``xray-evaluate --eval_data``: a hospital's own set, or the paper's extra COVID-19 images.
    Classes of the task absent from the folder simply have no images (``class_counts`` says 0).
    """
    class_names = class_names_for(task)
    rows, problems = _read_labelled_folder(folder, "--eval_data", "eval", "eval")
    frame, excluded = _task_rows(rows, task)
    _raise_problems(problems + _missing_files(frame))
    if frame.empty:
        raise DataError(f"{os.path.join(folder, EXTRA_METADATA)}: no image of task {task!r}'s classes "
                        f"({', '.join(class_names)}).")
    return DataIndex(frame=frame[_INDEX_COLUMNS].reset_index(drop=True), class_names=class_names, excluded=excluded)
