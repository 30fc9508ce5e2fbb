"""A synthetic stand-in for the CoronaHack dataset, in the exact Kaggle layout.

``xray-synthetic --out DIR`` writes ``Chest_xray_Corona_Metadata.csv`` and
``Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset/{train,test}/`` with all four classes,
imbalanced like the real data (COVID-19 rare), plus two Stress-Smoking rows that belong to no
class. Images are drawn chest-like phantoms of varied size, grey or RGB, JPEG or 8/16-bit PNG, so
the demo and the tests exercise the same decoding as real downloads. Each class has its own
structure a CNN can learn:

* Normal: clear lung fields;
* Bacteria: one dense, sharply bounded consolidation in one lung (lobar pneumonia);
* Virus: diffuse bilateral streaks around the hila (interstitial pattern);
* COVID-19: several soft, peripheral patches low in both lungs (ground-glass opacities).

It is no substitute for real X-rays: use it to check that the tooling works, never to judge a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pandas as pd
from PIL import Image

import xray_tf
from xray_tf import data

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


def write_dataset(out_dir: str, num_train: int = 400, num_test: int = 80, seed: int = 0,
                  min_size: int = 96, max_size: int = 192) -> str:
    """Write a synthetic CoronaHack dataset to ``out_dir`` (created; must not exist) and return it.

    The folder appears complete or not at all: it is written beside its target and renamed.
    """
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists; choose a new folder.")
    rng = np.random.default_rng(seed)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        image_root = os.path.join(staging, data.IMAGE_FOLDER, data.IMAGE_FOLDER)
        rows = []
        plan = [("TRAIN", label, n) for label, n in _class_counts(num_train).items()]
        plan += [("TEST", label, n) for label, n in _class_counts(num_test).items()]
        plan.append(("TRAIN", "Stress-Smoking", 2))
        kinds = ["grey_jpeg"] * 6 + ["rgb_png", "gray16_png"]
        for dataset_type, label, count in plan:
            folder = os.path.join(image_root, dataset_type.lower())
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                kind = kinds[rng.integers(len(kinds))]
                name = f"{label.lower()}-{dataset_type.lower()}-{i:04d}.{'jpeg' if kind == 'grey_jpeg' else 'png'}"
                image = draw_xray(label, int(rng.integers(min_size, max_size + 1)), rng)
                _save(image, os.path.join(folder, name), kind)
                csv_label, category_2, category_1 = _CSV_LABELS[label]
                rows.append((name, csv_label, dataset_type, category_2, category_1))
        metadata = pd.DataFrame(rows, columns=["X_ray_image_name", "Label", "Dataset_type",
                                               "Label_2_Virus_category", "Label_1_Virus_category"])
        metadata.to_csv(os.path.join(staging, data.METADATA_CSV))  # keeps the unnamed index column
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
