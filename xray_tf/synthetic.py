"""A synthetic stand-in for the CoronaHack dataset, in CoronaHack's and three other layouts.

``xray-synthetic --out DIR [--format=LAYOUT]`` writes all four classes, imbalanced like the real CoronaHack TRAIN
split (COVID-19 rare). Images are drawn chest-like phantoms of varied size, grey or RGB, JPEG or
8/16-bit PNG, so the demo and the tests exercise the same decoding as real downloads. Each class
has its own structure a CNN can learn:

* Normal: clear lung fields;
* Bacteria: one dense, sharply bounded consolidation in one lung (lobar pneumonia);
* Virus: diffuse bilateral streaks around the hila (interstitial pattern);
* COVID-19: several soft, peripheral patches low in both lungs (ground-glass opacities).

Four layouts (``LAYOUTS``) hold the same images for the same seed, only placed and named apart, so
they compare by counts: ``coronahack``, Kaggle's download (``Chest_xray_Corona_Metadata.csv`` and
``Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset/{train,test}/``, plus two Stress-Smoking
rows of no class); ``kermany``, Kermany et al.'s ``{train,val,test}/{NORMAL,PNEUMONIA}/`` (no COVID-19;
val is the first two TRAIN images of a class; ``person{P}_bacteria_{N}``, ``person{P}_virus_{N}`` and
``IM-{S}-{K}`` names); ``folders``, ``{train,test}/<class>/``; ``csv``, ``labels.csv``
(``path,label,split,patient_id``) beside ``images/``. Where a layout names patients, two consecutive
images of a class and split are one.

It is no substitute for real X-rays: use it to check that the tooling works, never to judge a model.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator

import numpy as np
import pandas as pd
from PIL import Image

import xray_tf
from xray_tf import layouts

# Per-class shares of the real CoronaHack TRAIN split (1342 / 2535 / 1349 / 58 of 5284).
_TRAIN_SHARES = {"Normal": 0.254, "Bacteria": 0.480, "Virus": 0.255, "COVID-19": 0.011}
_CSV_LABELS = {  # class -> (Label, Label_2_Virus_category, Label_1_Virus_category)
    "Normal": ("Normal", None, None),
    "Bacteria": ("Pnemonia", None, "bacteria"),
    "Virus": ("Pnemonia", None, "Virus"),
    "COVID-19": ("Pnemonia", "COVID-19", "Virus"),
    "Stress-Smoking": ("Pnemonia", "ARDS", "Stress-Smoking"),
}
_MIN_PER_CLASS = 6


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def draw_xray(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size x size`` float image in [0, 1] with the structure of ``label``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.full((size, size), 0.08)
    image[_ellipse(yy, xx, 0.55, 0.5, 0.5, 0.42) < 1] = 0.55  # body
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        lung = _ellipse(yy, xx, rng.uniform(0.47, 0.53), cx, rng.uniform(0.28, 0.32), rng.uniform(0.11, 0.14)) < 1
        image[lung] = 0.18
        lungs.append((lung, cx))
    image[(np.abs(xx - 0.5) < 0.035) & (yy > 0.15)] = 0.8  # spine

    if label == "Bacteria":
        lung, cx = lungs[rng.integers(2)]
        blob = _ellipse(yy, xx, rng.uniform(0.4, 0.62), cx, rng.uniform(0.08, 0.12), rng.uniform(0.06, 0.09)) < 1
        image[blob & lung] = rng.uniform(0.7, 0.85)
    elif label == "Virus":
        for _ in range(rng.integers(10, 16)):
            side = rng.choice([-1, 1])
            angle = rng.uniform(-1.2, 1.2)
            along = (xx - 0.5 - side * 0.1) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
            across = -(xx - 0.5 - side * 0.1) * np.sin(angle) + (yy - 0.5) * np.cos(angle)
            streak = (np.abs(across) < 0.008) & (np.abs(along) < rng.uniform(0.08, 0.18))
            image[streak & (lungs[0][0] | lungs[1][0])] += 0.35
    elif label == "COVID-19":
        for lung, cx in lungs:
            for _ in range(rng.integers(2, 4)):
                cy = rng.uniform(0.6, 0.75)
                px = cx + np.sign(cx - 0.5) * rng.uniform(0.05, 0.09)
                patch = np.exp(-_ellipse(yy, xx, cy, px, 0.07, 0.05))
                image += 0.35 * patch * lung

    image *= rng.uniform(0.85, 1.15)
    image += rng.normal(0.0, 0.03, image.shape)
    return np.clip(image, 0.0, 1.0)


def _save(image: np.ndarray, path: str, kind: str) -> None:
    """Write ``image`` as grey JPEG, RGB PNG or 16-bit grey PNG, like the mix in real downloads."""
    if kind == "grey_jpeg":
        Image.fromarray((image * 255).astype(np.uint8), "L").save(path, quality=92)
    elif kind == "rgb_png":
        grey = (image * 255).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB").save(path)
    else:  # 16-bit grey PNG
        Image.fromarray((image * 65535).astype(np.uint16)).save(path)


def _class_counts(total: int) -> dict[str, int]:
    return {label: max(_MIN_PER_CLASS, int(round(total * share))) for label, share in _TRAIN_SHARES.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class _Drawn:
    """One drawn image and where it stands in the plan; layouts place it from these alone."""

    split: str  # "TRAIN" or "TEST"
    label: str  # a class, or "Stress-Smoking"
    index: int  # its number within its class and split
    kind: str  # how ``_save`` writes it
    pixels: np.ndarray

    @property
    def extension(self) -> str:
        return "jpeg" if self.kind == "grey_jpeg" else "png"

    @property
    def name(self) -> str:
        """The CoronaHack-layout file name, which the ``folders`` and ``csv`` layouts keep."""
        return f"{self.label.lower()}-{self.split.lower()}-{self.index:04d}.{self.extension}"


def _draw_all(num_train: int, num_test: int, seed: int, min_size: int, max_size: int) -> Iterator[_Drawn]:
    """Every image of the plan, in the one order and from the one rng stream that all layouts share."""
    rng = np.random.default_rng(seed)
    plan = [("TRAIN", label, n) for label, n in _class_counts(num_train).items()]
    plan += [("TEST", label, n) for label, n in _class_counts(num_test).items()]
    plan.append(("TRAIN", "Stress-Smoking", 2))
    kinds = ["grey_jpeg"] * 6 + ["rgb_png", "gray16_png"]
    for split, label, count in plan:
        for index in range(count):
            kind = kinds[rng.integers(len(kinds))]
            pixels = draw_xray(label, int(rng.integers(min_size, max_size + 1)), rng)
            yield _Drawn(split, label, index, kind, pixels)


class _PatientNumbers:
    """Patient numbers 1, 1, 2, 2, ... down a class and split: two consecutive images are one patient."""

    def __init__(self) -> None:
        self._last: collections.Counter = collections.Counter()

    def of(self, image: _Drawn, numbering: Hashable) -> int:
        """The patient of ``image``; each ``numbering`` counts its patients from 1 on its own."""
        if image.index % 2 == 0:
            self._last[numbering] += 1
        return self._last[numbering]


class _Layout:
    """Where each drawn image goes, and what is written once all are."""

    def place(self, image: _Drawn) -> str | None:
        """The path of ``image`` inside the dataset, or None where the layout has no place for it."""
        raise NotImplementedError

    def finish(self, root: str) -> None:
        """Write the metadata into ``root``; by default none, as the folders are the labels."""


class _CoronaHack(_Layout):
    """Kaggle's CoronaHack download: the metadata CSV and one folder per split."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []

    def place(self, image: _Drawn) -> str | None:
        csv_label, category_2, category_1 = _CSV_LABELS[image.label]
        self._rows.append((image.name, csv_label, image.split, category_2, category_1))
        return os.path.join(layouts.IMAGE_FOLDER, layouts.IMAGE_FOLDER, image.split.lower(), image.name)

    def finish(self, root: str) -> None:
        metadata = pd.DataFrame(self._rows, columns=["X_ray_image_name", "Label", "Dataset_type",
                                                     "Label_2_Virus_category", "Label_1_Virus_category"])
        metadata.to_csv(os.path.join(root, layouts.METADATA_CSV))  # keeps the unnamed index column


class _Kermany(_Layout):
    """Kermany et al.'s download: ``{train,val,test}/{NORMAL,PNEUMONIA}/`` with patients in the names."""

    _FOLDERS = {"Normal": "NORMAL", "Bacteria": "PNEUMONIA", "Virus": "PNEUMONIA"}  # it has no COVID-19
    _VAL_PER_CLASS = 2  # its official val split is that tiny; even, so no patient straddles val and train

    def __init__(self) -> None:
        self._patients = _PatientNumbers()
        self._pneumonia_files = 0

    def place(self, image: _Drawn) -> str | None:
        folder = self._FOLDERS.get(image.label)
        if folder is None:
            return None
        if image.split == "TEST":
            split = "test"
        else:
            split = "val" if image.index < self._VAL_PER_CLASS else "train"
        # Its test cohort is numbered afresh; its val patients come from the train numbering.
        patient = self._patients.of(image, (image.split, folder))
        if folder == "NORMAL":
            name = f"IM-{patient:04d}-{image.index % 2 + 1:04d}.{image.extension}"
        else:
            self._pneumonia_files += 1
            name = f"person{patient}_{image.label.lower()}_{self._pneumonia_files}.{image.extension}"
        return os.path.join(split, folder, name)


class _Folders(_Layout):
    """A folder per class inside ``train/`` and ``test/``."""

    def place(self, image: _Drawn) -> str | None:
        if image.label not in _TRAIN_SHARES:
            return None
        return os.path.join(image.split.lower(), image.label, image.name)


class _Csv(_Layout):
    """``labels.csv`` (``path,label,split,patient_id``) beside ``images/``."""

    def __init__(self) -> None:
        self._patients = _PatientNumbers()
        self._rows: list[tuple[str, str, str, str]] = []

    def place(self, image: _Drawn) -> str | None:
        if image.label not in _TRAIN_SHARES:
            return None
        patient = self._patients.of(image, numbering=None)  # one numbering: ids never repeat across splits
        path = f"images/{image.name}"  # relative to the CSV, with the separator of every platform
        self._rows.append((path, image.label, image.split.lower(), f"p{patient:04d}"))
        return path

    def finish(self, root: str) -> None:
        labels = pd.DataFrame(self._rows, columns=["path", "label", "split", "patient_id"])
        labels.to_csv(os.path.join(root, "labels.csv"), index=False)


_LAYOUTS: dict[str, type[_Layout]] = {"coronahack": _CoronaHack, "kermany": _Kermany, "folders": _Folders, "csv": _Csv}
LAYOUTS = tuple(_LAYOUTS)


def write_dataset(out_dir: str, num_train: int = 400, num_test: int = 80, seed: int = 0,
                  min_size: int = 96, max_size: int = 192, layout: str = "coronahack") -> str:
    """Write a synthetic dataset in ``layout`` (one of ``LAYOUTS``) to ``out_dir`` and return it.

    ``out_dir`` is created and must not exist. About ``num_train`` TRAIN and ``num_test`` TEST
    images are drawn (at least six per class), ``min_size`` to ``max_size`` pixels square; the same
    seed draws the same images in every layout, which skips those it has no place for (module
    docstring). The folder appears complete or not at all: it is written beside its target and renamed.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a layout; choose one of {', '.join(LAYOUTS)}.")
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists; choose a new folder.")
    writer = _LAYOUTS[layout]()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        for image in _draw_all(num_train, num_test, seed, min_size, max_size):
            relative = writer.place(image)
            if relative is None:
                continue  # drawn all the same, so the images after it are those of every layout
            path = os.path.join(staging, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _save(image.pixels, path, image.kind)
        writer.finish(staging)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def default_dataset_dir() -> str:
    """Where the trainer keeps the synthetic dataset it uses when no ``--data_dir`` is given."""
    return os.path.join(xray_tf.cache_dir(), "synthetic-v1")


def ensure_default_dataset() -> str:
    """Return the default synthetic dataset, generating it on first use."""
    path = default_dataset_dir()
    if not os.path.isdir(path):
        try:
            write_dataset(path)
        except FileExistsError:  # another process finished first; its copy is complete
            pass
    return path
