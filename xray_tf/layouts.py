"""The dataset layouts the index reads, which one a folder holds, and one table of every image each gives.

Layouts (``--data_format``; README "Your own data"):

* ``coronahack``: Kaggle's ``Chest_xray_Corona_Metadata.csv`` and its image folders.
* ``metadata``: ``metadata.csv`` (``X_ray_image_name,Label[,patientid]``) beside ``images/``, the
  ``--extra_data`` layout.
* ``kermany``: Kermany et al.'s download, ``{train,val,test}/{NORMAL,PNEUMONIA}/`` (optionally inside
  ``chest_xray/``); bacteria and virus are told apart by the file name (``person1_virus_6.jpeg``).
* ``folders``: ``DIR/<class>/...`` or ``DIR/{train,val,test}/<class>/...``, the ImageFolder convention.
* ``csv``: a CSV of ``path,label[,split][,patient_id]``, paths relative to the CSV.

The first three label their images with the fine classes (``config.FINE_CLASSES``, which the task maps);
folders and csv bring their own labels. Every reader returns a ``Source`` whose table has the
same columns, so everything after it (the task, the splits, the checks) is one code path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from xray_tf.config import FINE_CLASSES
from xray_tf.tables import DataError, describe_rows, given_patients, image_paths, read_csv_checked, table_problems

METADATA_CSV = "Chest_xray_Corona_Metadata.csv"
IMAGE_FOLDER = "Coronahack-Chest-XRay-Dataset"
EXCLUDED_CATEGORY = "Stress-Smoking"
EXTRA_METADATA = "metadata.csv"  # of a folder in the metadata layout, beside images/
EXTRA_IMAGES = "images"
KERMANY_FOLDER = "chest_xray"  # what Kermany's zip unpacks to
KERMANY_CLASSES = ("NORMAL", "PNEUMONIA")
SPLIT_FOLDERS = ("train", "val", "test")
# By extension: what a folder walk takes for an image. TIFF and DICOM are taken too, so that the
# decoder refuses them by name rather than the walk passing over them in silence.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".dcm")
COLUMNS = ["file", "path", "outside", "label", "split", "patient_id"]
_CORONAHACK_COLUMNS = ("X_ray_image_name", "Label", "Dataset_type", "Label_1_Virus_category",
                       "Label_2_Virus_category")


@dataclasses.dataclass(frozen=True)
class Source:
    """The images of one folder or CSV file in one layout.

    ``frame`` has ``COLUMNS``: the file name (patient ids are read from it), the absolute path, whether
    the metadata named a file outside its folder (never read), the label (NaN where no rule places
    it), the split (train, val or test) and a given patient id (or NaN).
    """

    layout: str
    location: str
    frame: pd.DataFrame
    fine_labels: bool  # labels are FINE_CLASSES (or EXCLUDED_CATEGORY), which the task maps
    holds: tuple[str, ...]  # the fine classes this layout can hold at all
    problems: tuple[str, ...] = ()  # one paragraph each
    excluded: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> files left out
    notes: tuple[str, ...] = ()  # what the log says about how the layout was read


def coronahack_fine_classes(metadata: pd.DataFrame) -> pd.Series:
    """Per row: one of FINE_CLASSES, EXCLUDED_CATEGORY, or NaN when the labels make no sense.

    ``Label == Normal`` is Normal; ``Label_2_Virus_category == COVID-19`` is COVID-19; otherwise
    ``Label_1_Virus_category`` ``bacteria`` is Bacteria and ``Virus`` is Virus (the dataset README).
    """
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


def _coronahack_root(folder: str) -> str:
    """The folder holding ``train/`` and ``test/`` in the Kaggle layout, nested twice or once."""
    candidates = [os.path.join(folder, IMAGE_FOLDER, IMAGE_FOLDER), os.path.join(folder, IMAGE_FOLDER)]
    for root in candidates:
        if os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "test")):
            return root
    raise DataError(f"{folder}: found {METADATA_CSV} but no image folders; expected {candidates[0]}/train (or "
                    f"{candidates[1]}/train).")


def read_coronahack(folder: str) -> Source:
    """The Kaggle CoronaHack layout: TRAIN rows are split train, TEST rows test."""
    csv_path = os.path.join(folder, METADATA_CSV)
    if not os.path.isfile(csv_path):
        raise DataError(f"{folder}: no {METADATA_CSV} there (the Kaggle CoronaHack layout).")
    image_root = _coronahack_root(folder)
    metadata = read_csv_checked(csv_path, _CORONAHACK_COLUMNS)
    dataset_type = metadata["Dataset_type"].astype("string").str.strip().str.upper()
    known_type = dataset_type.isin(["TRAIN", "TEST"]).fillna(False).astype(bool)
    problems = []
    if not known_type.all():
        problems.append(f"{csv_path}: {int((~known_type).sum())} row(s) with Dataset_type other than TRAIN/TEST:\n"
                        + describe_rows(metadata[~known_type], ["X_ray_image_name", "Dataset_type"]))
    metadata = metadata[known_type]
    split = dataset_type[known_type].str.lower().astype(str)
    paths = pd.Series(index=metadata.index, dtype=object)
    outside = pd.Series(False, index=metadata.index)
    for name in ("train", "test"):
        rows = split == name
        paths[rows], outside[rows] = image_paths(os.path.join(image_root, name), metadata.loc[rows, "X_ray_image_name"])
    rows = metadata.assign(file=metadata["X_ray_image_name"].astype(str), path=paths, outside=outside.astype(bool),
                           label=coronahack_fine_classes(metadata), split=split, patient_id=given_patients(metadata))
    problems += table_problems(rows, csv_path, ["X_ray_image_name", *_CORONAHACK_COLUMNS[1:]])
    return Source("coronahack", folder, rows[COLUMNS].reset_index(drop=True), True, FINE_CLASSES, tuple(problems))


def read_metadata(folder: str) -> Source:
    """The ``--extra_data`` layout: ``metadata.csv`` (X_ray_image_name, Label as a fine class) and ``images/``."""
    csv_path = os.path.join(folder, EXTRA_METADATA)
    if not os.path.isfile(csv_path):
        raise DataError(f"{folder}: no {EXTRA_METADATA} there (columns X_ray_image_name,Label, with the images in "
                        f"{EXTRA_IMAGES}/).")
    rows = read_csv_checked(csv_path, ("X_ray_image_name", "Label"))
    paths, outside = image_paths(os.path.join(folder, EXTRA_IMAGES), rows["X_ray_image_name"])
    label = rows["Label"].astype("string").str.strip()
    rows = rows.assign(file=rows["X_ray_image_name"].astype(str), path=paths, outside=outside,
                       label=label.where(label.isin(FINE_CLASSES)).astype(object), split="train",
                       patient_id=given_patients(rows))
    problems = table_problems(rows, csv_path, ["X_ray_image_name", "Label"])
    return Source("metadata", folder, rows[COLUMNS].reset_index(drop=True), True, FINE_CLASSES, tuple(problems))


def read_csv_file(csv_path: str) -> Source:
    """A CSV of ``path,label[,split][,patient_id]``; a row without a split is a training image."""
    table = read_csv_checked(csv_path, ("path", "label"))
    paths, outside = image_paths(os.path.dirname(os.path.abspath(csv_path)), table["path"])
    label = table["label"].astype("string").str.strip().replace("", pd.NA)
    split = (table["split"].astype("string").str.strip().str.lower().replace("", pd.NA) if "split" in table
             else pd.Series(pd.NA, index=table.index, dtype="string")).fillna("train")
    rows = table.assign(file=[os.path.basename(str(p)) for p in table["path"]], path=paths, outside=outside,
                        label=label.astype(object).where(label.notna()), split=split.astype(object),
                        patient_id=given_patients(table))
    problems = table_problems(rows, csv_path, ["path", "label"])
    bad_split = rows[~rows["split"].isin(SPLIT_FOLDERS)]
    if len(bad_split):
        problems.append(f"{csv_path}: {len(bad_split)} row(s) whose split is none of {', '.join(SPLIT_FOLDERS)} "
                        f"(or empty, for train):\n" + describe_rows(bad_split, ["path", "split"]))
    return Source("csv", csv_path, rows[COLUMNS].reset_index(drop=True), False, (), tuple(problems))


def _csv_tables(folder: str) -> list[str]:
    """The CSV files directly in ``folder`` whose header names a ``path`` and a ``label`` column."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.lower().endswith(".csv") and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    header = [column.strip() for column in handle.readline().split(",")]
            except OSError:
                continue
            if {"path", "label"} <= set(header):
                found.append(path)
    return found


def read_csv_folder(folder: str) -> Source:
    """The csv layout given as a folder: the one CSV in it with ``path`` and ``label`` columns."""
    tables = _csv_tables(folder)
    if len(tables) != 1:
        which = f"{len(tables)}: {', '.join(map(os.path.basename, tables))}" if tables else "none"
        raise DataError(f"{folder}: the csv layout needs exactly one CSV with path and label columns there, found "
                        f"{which}; name the file with --data_csv.")
    return read_csv_file(tables[0])


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith(".") and name != "__MACOSX")


def _walk_images(folder: str) -> tuple[list[str], int]:
    """``(image files under folder, sorted; how many other files there are)``; hidden entries do not count."""
    images, others = [], 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = _visible(dirs)
        for name in _visible(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.join(root, name))
            else:
                others += 1
    return sorted(images), others


def _subfolders(folder: str) -> list[str]:
    return [name for name in _visible(os.listdir(folder)) if os.path.isdir(os.path.join(folder, name))]


def _class_folder_rows(folder: str, split: str) -> tuple[pd.DataFrame, int]:
    """Rows of every image under ``folder/<class>/``, labelled by the class folder, and the count of other files."""
    rows, others = [], 0
    for label in _subfolders(folder):
        images, not_images = _walk_images(os.path.join(folder, label))
        rows += [(os.path.basename(path), path, label) for path in images]
        others += not_images
    others += sum(1 for name in _visible(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name)))
    frame = pd.DataFrame(rows, columns=["file", "path", "label"]).assign(split=split, outside=False,
                                                                          patient_id=np.nan)
    return frame, others


def _split_folders(folder: str) -> list[str]:
    return [name for name in SPLIT_FOLDERS if os.path.isdir(os.path.join(folder, name))]


def _read_class_folders(folder: str, layout: str) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """``folder/<class>/`` or ``folder/{train,val,test}/<class>/``: rows, problems and files left out."""
    splits = _split_folders(folder)
    parts, others, problems = [], 0, []
    if splits:
        strays = [name for name in _subfolders(folder) if name not in SPLIT_FOLDERS]
        if strays:
            problems.append(f"{folder}: folder(s) {', '.join(strays)} beside the split folders "
                            f"{'/, '.join(splits)}/: which split do they belong to? Move them into one.")
        for split in splits:
            frame, not_images = _class_folder_rows(os.path.join(folder, split), split)
            parts.append(frame)
            others += not_images
    else:
        frame, others = _class_folder_rows(folder, "train")
        parts.append(frame)
    frame = pd.concat(parts, ignore_index=True)[COLUMNS]
    if frame.empty:
        problems.append(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders.")
    return frame, problems, {f"not an image file (by extension), in {layout} layout": others} if others else {}


def read_folders(folder: str) -> Source:
    """A folder per class, optionally inside split folders; the class is the folder's name."""
    frame, problems, excluded = _read_class_folders(folder, "folders")
    return Source("folders", folder, frame, False, (), tuple(problems), excluded)


def _kermany_root(folder: str) -> str:
    nested = os.path.join(folder, KERMANY_FOLDER)
    return nested if not _split_folders(folder) and os.path.isdir(nested) else folder


def read_kermany(folder: str) -> Source:
    """Kermany's ``{train,val,test}/{NORMAL,PNEUMONIA}/``: the file name says bacteria or virus.

    Its val split (16 images in the download) joins train: validation is carved from train by
    patient, as from CoronaHack's TRAIN, which holds the same images.
    """
    root = _kermany_root(folder)
    frame, problems, excluded = _read_class_folders(root, "kermany")
    strays = sorted(set(frame["label"]) - set(KERMANY_CLASSES))
    if strays:
        problems.append(f"{root}: class folder(s) {', '.join(strays)}; Kermany's layout has only "
                        f"{' and '.join(KERMANY_CLASSES)} (for other classes use --data_format=folders).")
    name = frame["file"].str.lower()
    fine = np.select([frame["label"] == "NORMAL", name.str.contains("bacteria"), name.str.contains("virus")],
                     ["Normal", "Bacteria", "Virus"], default=None)
    frame = frame.assign(label=pd.Series(fine, index=frame.index, dtype=object))
    pneumonia = frame["label"].isna() & frame["path"].str.contains(os.sep + "PNEUMONIA" + os.sep, regex=False)
    if pneumonia.any():
        problems.append(f"{root}: {int(pneumonia.sum())} image(s) in PNEUMONIA/ whose name says neither bacteria "
                        f"nor virus (Kermany's names do, e.g. person1_virus_6.jpeg):\n"
                        + describe_rows(frame[pneumonia], ["path"]))
    notes = []
    in_val = frame["split"] == "val"
    if in_val.any():
        frame.loc[in_val, "split"] = "train"
        notes.append(f"{root}: Kermany's val split ({int(in_val.sum())} images) joins train, from which validation "
                     "is carved by patient.")
    return Source("kermany", folder, frame, True, ("Normal", "Bacteria", "Virus"), tuple(problems), excluded,
                  tuple(notes))


def _looks_kermany(folder: str) -> str | None:
    root = _kermany_root(folder)
    splits = _split_folders(root)
    classes = {name for split in splits for name in _subfolders(os.path.join(root, split))}
    if splits and classes and classes <= set(KERMANY_CLASSES):
        return f"{'/, '.join(splits)}/ in {root} hold only NORMAL/ and PNEUMONIA/ class folders"
    return None


def _holds_images(folder: str) -> bool:
    return any(any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files) for _, _, files in os.walk(folder))


def _looks_folders(folder: str) -> str | None:
    """Two class folders at least: one alone would be no classification (or a known layout missing its CSV)."""
    splits = _split_folders(folder)
    parents = [os.path.join(folder, split) for split in splits] or [folder]
    classes = {label for parent in parents for label in _subfolders(parent)
               if _holds_images(os.path.join(parent, label))}
    if len(classes) < 2:
        return None
    where = f"{'/, '.join(splits)}/ hold" if splits else "it holds"
    return f"{where} class folders with images: {', '.join(sorted(classes))}"


def _looks_coronahack(folder: str) -> str | None:
    return f"it holds {METADATA_CSV}" if os.path.isfile(os.path.join(folder, METADATA_CSV)) else None


def _looks_metadata(folder: str) -> str | None:
    if os.path.isfile(os.path.join(folder, EXTRA_METADATA)) and os.path.isdir(os.path.join(folder, EXTRA_IMAGES)):
        return f"it holds {EXTRA_METADATA} and {EXTRA_IMAGES}/"
    return None


def _looks_csv(folder: str) -> str | None:
    tables = _csv_tables(folder)
    return f"it holds {', '.join(map(os.path.basename, tables))} with path and label columns" if tables else None


# layout -> (what it looks for, the check saying why a folder matches, the reader). folders is the
# general case, taken only where no specific layout matches (Kaggle's CoronaHack folder has image
# folders too); two specific matches are ambiguous.
_LAYOUTS: dict[str, tuple[str, Callable[[str], str | None], Callable[[str], Source]]] = {
    "coronahack": (f"{METADATA_CSV} and {IMAGE_FOLDER}/", _looks_coronahack, read_coronahack),
    "metadata": (f"{EXTRA_METADATA} (X_ray_image_name,Label) and {EXTRA_IMAGES}/", _looks_metadata, read_metadata),
    "kermany": ("{train,val,test}/{NORMAL,PNEUMONIA}/ (or inside chest_xray/)", _looks_kermany, read_kermany),
    "csv": ("one CSV with path and label columns", _looks_csv, read_csv_folder),
    "folders": ("two or more <class>/ (or {train,val,test}/<class>/) folders holding images", _looks_folders,
                read_folders),
}
LAYOUTS = tuple(_LAYOUTS)


def detect(folder: str) -> tuple[str, str]:
    """``(layout, why)`` of the dataset in ``folder``; DataError listing what was looked for if none or two match."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a directory.")
    specific = {name: why for name, (_, looks, _) in _LAYOUTS.items() if name != "folders" and (why := looks(folder))}
    if len(specific) > 1:
        raise DataError(f"{folder}: ambiguous, it matches several layouts: "
                        + "; ".join(f"{name} ({why})" for name, why in specific.items())
                        + ". Choose one with --data_format.")
    if specific:
        return next(iter(specific.items()))
    why = _looks_folders(folder)
    if why:
        return "folders", why
    looked_for = "\n".join(f"  {name}: {what}" for name, (what, _, _) in _LAYOUTS.items())
    raise DataError(f"{folder}: holds no dataset layout known here. Looked for:\n{looked_for}")


def read(folder: str, layout: str = "auto") -> tuple[Source, str]:
    """``(the dataset in folder, why it was read as its layout)``: ``layout`` or, for ``auto``, the detected one."""
    if layout == "auto":
        layout, why = detect(folder)
    elif layout not in _LAYOUTS:
        raise DataError(f"{layout!r} is no layout; one of auto, {', '.join(LAYOUTS)}.")
    else:
        why = "as asked"
    return _LAYOUTS[layout][2](folder), why
