"""``python scripts/explore_dataset.py --data_dir=... --out_dir=FIGURES``: the paper's Figures 1 and 2.

* ``figure1_class_counts.png``: images per class in each split (a log axis, so that COVID-19's few
  images are a visible bar), and each split's class distribution; every bar is labelled. The splits
  are those training uses: TRAIN less a stratified, seeded validation share, and TEST where the data
  has one (the shared development copy withholds TEST).
* ``figure2_samples_intensities.png``: two images of each class, and per class the distribution of
  pixel intensities over up to --max_images_per_class images drawn (seeded) from all splits, less
  the black border's darkest levels (``plots.BLACK_BORDER``), whose spike hid the differences.

Images are decoded exactly as for training (grey, resized to --image_size), so the histograms show
what the model is given.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
from absl import app, flags

from xray_tf import data, decode, plots
from xray_tf.config import TrainConfig

SAMPLES_PER_CLASS = 2
_DEFAULTS = TrainConfig()

_DATA_DIR = flags.DEFINE_string("data_dir", None, "CoronaHack folder (holding Chest_xray_Corona_Metadata.csv).",
                                required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the PNG files (created if needed).", required=True)
_TASK = flags.DEFINE_enum("task", _DEFAULTS.task, list(data.TASKS), "Which classes to count.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", _DEFAULTS.val_fraction, "Validation share of TRAIN, as in training.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of the validation split and of the image draw.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", _DEFAULTS.image_size,
                                   "Images are decoded at this size, as in training.")
_MAX_IMAGES = flags.DEFINE_integer("max_images_per_class", 200, "Images per class for the intensity histograms.")


def draw_images(frame: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``max_per_class`` rows of each class, drawn without replacement in a seeded order."""
    rng = np.random.default_rng(seed)
    ordered = frame.sort_values("file", kind="stable")
    drawn = [group.iloc[rng.permutation(len(group))[:max_per_class]] for _, group in ordered.groupby("label_index")]
    return pd.concat(drawn)


def samples_and_histograms(
    frame: pd.DataFrame, class_names: tuple[str, ...], image_size: int
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray], dict[str, int]]:
    """Decode ``frame``'s images; return per class the first two images, the grey-level shares, the image count."""
    samples = {name: [] for name in class_names}
    counts = {name: np.zeros(256, dtype=np.int64) for name in class_names}
    images_per_class = dict.fromkeys(class_names, 0)
    for image, label in decode.decoded_dataset(frame, image_size).prefetch(8):
        name = class_names[int(label)]
        pixels = image.numpy()[..., 0]
        if len(samples[name]) < SAMPLES_PER_CLASS:
            samples[name].append(pixels)
        counts[name] += np.bincount(pixels.ravel(), minlength=256)
        images_per_class[name] += 1
    histograms = {name: counts[name] / counts[name].sum() for name in class_names}
    return samples, histograms, images_per_class


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if _MAX_IMAGES.value < SAMPLES_PER_CLASS:
        sys.exit(f"explore_dataset: error: --max_images_per_class={_MAX_IMAGES.value} is below {SAMPLES_PER_CLASS}.")
    if _IMAGE_SIZE.value < 1:
        sys.exit(f"explore_dataset: error: --image_size={_IMAGE_SIZE.value} must be positive.")
    try:
        index = data.load_index(_DATA_DIR.value, _TASK.value, _VAL_FRACTION.value, _SEED.value)
    except (ValueError, FileNotFoundError) as error:  # DataError is a ValueError
        sys.exit(f"explore_dataset: error: {error}")
    print(index.summary())
    name = os.path.basename(os.path.normpath(_DATA_DIR.value))
    counts = {split: index.class_counts(split) for split in data.SPLITS}
    figure1 = plots.class_counts_figure(counts, f"{name}: {_TASK.value}")
    path1 = plots.save(figure1, os.path.join(_OUT_DIR.value, "figure1_class_counts.png"))

    drawn = draw_images(index.frame, _MAX_IMAGES.value, _SEED.value)
    samples, histograms, images_per_class = samples_and_histograms(drawn, index.class_names, _IMAGE_SIZE.value)
    figure2 = plots.samples_and_intensities_figure(samples, histograms, images_per_class,
                                                   f"{name}: {_IMAGE_SIZE.value} px, grey")
    path2 = plots.save(figure2, os.path.join(_OUT_DIR.value, "figure2_samples_intensities.png"))
    print(f"Wrote {path1} and {path2}")


if __name__ == "__main__":
    app.run(main)
