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
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from xray_tf.config import FINE_CLASSES, TASKS, ConfigError

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


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the file and the rows."""


@dataclasses.dataclass(frozen=True)
class DataIndex:
    """All images of one task: ``frame`` has columns path, file, label, label_index, split, source."""

    frame: pd.DataFrame
    class_names: tuple[str, ...]
    excluded: dict[str, int]  # reason -> number of rows left out

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
        index = DataIndex(
            frame=self.frame[~dropped].reset_index(drop=True),
            class_names=self.class_names,
            excluded={**self.excluded, reason: int(dropped.sum())},
        )
        index.require_training_images(f"Without the {int(dropped.sum())} image(s) {reason}, the dataset")
        return index

    def summary(self) -> str:
        lines = [
            f"{split:>5}: {len(self.split(split)):5d} images  "
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
    """Read a CSV that must exist, have the ``required`` columns and at least one row.

    Every failure raises ``error`` with a message naming the file; ``rows`` is what a row is
    called in the message ("no epochs" for a history file).
    """
    try:
        frame = pd.read_csv(csv_path)
    except FileNotFoundError:
        raise error(f"{csv_path}: no such file.") from None
    except pd.errors.EmptyDataError:
        raise error(f"{csv_path}: the file is empty.") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise error(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}.")
    if frame.empty:
        raise error(f"{csv_path}: no {rows}.")
    return frame


def _check_rows(frame: pd.DataFrame, csv_path: str, label_columns: list[str]) -> None:
    """Raise one DataError naming every unknown label, duplicate and missing file in ``frame``."""
    problems = []
    unknown = frame[frame["fine_class"].isna()]
    if len(unknown):
        problems.append(
            f"{len(unknown)} row(s) with labels that match no class rule:\n"
            + _describe_rows(unknown, ["X_ray_image_name", *label_columns])
        )
    duplicated = frame[frame.duplicated("path", keep=False)]
    if len(duplicated):
        problems.append(
            f"{len(duplicated)} row(s) naming the same image more than once:\n"
            + _describe_rows(duplicated, ["X_ray_image_name", "split"])
        )
    missing = frame[~frame["path"].map(os.path.isfile)]
    if len(missing):
        problems.append(
            f"{len(missing)} row(s) whose image file does not exist:\n" + _describe_rows(missing, ["path"])
        )
    if problems:
        raise DataError(f"{csv_path}:\n" + "\n".join(problems))


def _stratified_validation(frame: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """Mark ``round(n * val_fraction)`` rows of each class (at least one if it has two) as "val".

    Rows are ordered by file name before the seeded permutation, so the split depends only on the
    seed and the set of files, not on the CSV's row order.
    """
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=frame.index, dtype="object")
    for label in sorted(frame["label"].unique()):
        members = frame.index[frame["label"] == label]
        members = members[np.argsort(frame.loc[members, "file"].to_numpy(), kind="stable")]
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        split[members[rng.permutation(len(members))[:n_val]]] = "val"
    return split


def _read_extra_data(extra_dir: str) -> pd.DataFrame:
    """Rows for ``--extra_data``: ``metadata.csv`` (X_ray_image_name, Label) and ``images/``."""
    csv_path = os.path.join(extra_dir, "metadata.csv")
    if not os.path.isfile(csv_path):
        raise DataError(f"{extra_dir} (extra data): no metadata.csv there.")
    extra = read_csv_checked(csv_path, ("X_ray_image_name", "Label"))
    extra = extra.assign(
        path=[os.path.join(extra_dir, "images", name) for name in extra["X_ray_image_name"].astype(str)],
        fine_class=extra["Label"].where(extra["Label"].isin(FINE_CLASSES)),
        split="train",
        source="extra",
    )
    _check_rows(extra, csv_path, ["Label"])
    return extra


def load_index(
    data_dir: str,
    task: str = "four_class",
    val_fraction: float = 0.1,
    seed: int = 0,
    extra_data: str | None = None,
) -> DataIndex:
    """Read the CoronaHack metadata and return the task's images with their class and split.

    TRAIN rows are split into train/val (stratified, seeded); TEST rows, when present, become
    "test". ``extra_data`` images join train only (never val or test).
    """
    class_names = class_names_for(task)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "must be strictly between 0 and 1.")
    csv_path, image_root = locate_dataset(data_dir)
    metadata = read_csv_checked(csv_path, _REQUIRED_COLUMNS)

    dataset_type = metadata["Dataset_type"].astype("string").str.strip().str.upper()
    bad_type = metadata[~dataset_type.isin(["TRAIN", "TEST"]).fillna(False)]
    if len(bad_type):
        raise DataError(
            f"{csv_path}: {len(bad_type)} row(s) with Dataset_type other than TRAIN/TEST:\n"
            + _describe_rows(bad_type, ["X_ray_image_name", "Dataset_type"])
        )
    folder = dataset_type.str.lower()
    metadata = metadata.assign(
        path=[os.path.join(image_root, f, str(n)) for f, n in zip(folder, metadata["X_ray_image_name"])],
        fine_class=fine_classes(metadata),
        split=np.where(folder == "test", "test", "train"),
        source="coronahack",
    )
    _check_rows(metadata, csv_path, list(_REQUIRED_COLUMNS[1:]))
    frames = [metadata]
    if extra_data:
        frames.append(_read_extra_data(extra_data))
    frame = pd.concat(frames, ignore_index=True)

    task_map = TASKS[task]
    excluded = {}
    not_a_class = frame["fine_class"] == EXCLUDED_CATEGORY
    if not_a_class.any():
        excluded[f"{EXCLUDED_CATEGORY}, in no class"] = int(not_a_class.sum())
    outside_task = ~frame["fine_class"].isin(list(task_map)) & ~not_a_class
    for fine, count in frame.loc[outside_task, "fine_class"].value_counts().items():
        excluded[f"{fine}, not in task {task}"] = int(count)
    frame = frame[frame["fine_class"].isin(list(task_map))].copy()

    frame["label"] = frame["fine_class"].map(task_map)
    frame["label_index"] = frame["label"].map({name: i for i, name in enumerate(class_names)}).astype("int64")
    frame["file"] = frame["X_ray_image_name"].astype(str)
    organizer_train = (frame["split"] == "train") & (frame["source"] == "coronahack")
    frame.loc[organizer_train, "split"] = _stratified_validation(frame[organizer_train], val_fraction, seed)

    index = DataIndex(
        frame=frame[["path", "file", "label", "label_index", "split", "source"]].reset_index(drop=True),
        class_names=class_names,
        excluded=excluded,
    )
    index.require_training_images(f"{csv_path}: task {task!r}")
    return index
