"""Input pipeline throughput: xray_tf's tf.data pipeline against a PyTorch DataLoader doing the same work.

Both sides read the same files, decode to one grey channel, resize to --image_size (bilinear with
antialiasing), draw a class-balanced epoch (PyTorch: WeightedRandomSampler with reciprocal-count
weights), flip horizontally and vertically with p=0.5 each, rotate within +-15 degrees with p=0.3,
and deliver uint8 batches. PyTorch uses --workers DataLoader workers; tf.data uses AUTOTUNE on the
same cores. The two sides run interleaved (ours, theirs, ours, theirs, ...) so that drifting machine
load hits both; the script reports medians and their ratio.

Two measurements:
* first epoch: ``../shared/data/fullres`` (40 full-resolution JPEG/PNG files of 440-2500 px, grey
  and RGB) repeated to --decode_files paths; ours = the one decode+check+cache pass that training
  makes before its first epoch, then one epoch;
* cached epochs: ``../shared/data/coronahack`` TRAIN split; ours reads the uint8 cache, PyTorch
  decodes every image every epoch (what a DataLoader does without extra code).

    python -m benchmarks.pipeline --repeats=3
"""

from __future__ import annotations

import os
import random
import statistics
import time

import numpy as np
import pandas as pd
from absl import app, flags

from xray_tf import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("shared", os.path.join(REPO_ROOT, "..", "shared", "data"),
                    "The folder holding fullres/ and coronahack/.")
flags.DEFINE_integer("image_size", 224, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("workers", os.cpu_count(), "DataLoader workers.")
flags.DEFINE_integer("decode_files", 320, "Paths in the first-epoch measurement (fullres/ repeated).")
flags.DEFINE_integer("repeats", 3, "Interleaved repeats per side.")
FLAGS = flags.FLAGS


def tfdata_epoch_seconds(frame: pd.DataFrame, image_size: int, batch_size: int, first_epoch: bool) -> float:
    """Seconds for one training epoch of xray_tf's pipeline (including the decode pass if ``first_epoch``).

    The decode pass is the one a training run makes: every file decoded once, checked and kept as the
    in-memory cache (``image_cache.decode_images``, as ``preflight.prepare_data`` calls it).
    """
    from xray_tf import image_cache, pipeline

    settings = pipeline.PipelineSettings(image_size=image_size, batch_size=batch_size, cache="memory")
    datasets = pipeline.build_datasets(frame, int(frame["label_index"].max()) + 1, settings)
    if not first_epoch:  # decode outside the clock, then time a cached epoch after a warm-up one
        pipeline.fill_caches(datasets, log_every_s=1e9)
        for _ in datasets.epochs(0, 1):
            pass
    start = time.perf_counter()
    if first_epoch:
        decoded = image_cache.decode_images(frame["path"], image_size, "memory", log_every_s=1e9)
        pipeline.fill_caches(datasets, decoded)
    for images, _ in datasets.epochs(1, 2):
        images.numpy()
    return time.perf_counter() - start


def torch_epoch_seconds(frame: pd.DataFrame, image_size: int, batch_size: int, workers: int) -> float:
    """Seconds for one epoch of a PyTorch DataLoader doing the same decode, sampling and augmentation."""
    import torch
    from PIL import Image

    class XrayFiles(torch.utils.data.Dataset):
        def __init__(self, paths: list[str], labels: list[int]):
            self.paths, self.labels = paths, labels

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int):
            image = Image.open(self.paths[i]).convert("L").resize((image_size, image_size), Image.BILINEAR)
            # Python's random module: DataLoader reseeds it in every worker (NumPy's it does not).
            if random.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if random.random() < 0.5:
                image = image.transpose(Image.FLIP_TOP_BOTTOM)
            if random.random() < 0.3:
                image = image.rotate(random.uniform(-15, 15), resample=Image.BILINEAR)
            return torch.from_numpy(np.asarray(image)[:, :, None].copy()), self.labels[i]

    labels = frame["label_index"].to_numpy()
    weights = 1.0 / np.bincount(labels)[labels]
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(frame), replacement=True)
    loader = torch.utils.data.DataLoader(
        XrayFiles(list(frame["path"]), list(labels)), batch_size=batch_size, sampler=sampler,
        num_workers=workers, persistent_workers=False,
    )
    start = time.perf_counter()
    for images, _ in loader:
        images.numpy()
    return time.perf_counter() - start


def decode_frame(shared: str, files: int) -> pd.DataFrame:
    fullres = os.path.join(shared, "fullres")
    metadata = pd.read_csv(os.path.join(fullres, "metadata.csv"))
    classes = sorted(metadata["Label"].unique())
    frame = pd.DataFrame({
        "path": [os.path.join(fullres, "images", name) for name in metadata["X_ray_image_name"]],
        "label_index": metadata["Label"].map(classes.index).astype("int64"),
    })
    frame = pd.concat([frame] * -(-files // len(frame)), ignore_index=True).head(files)
    return frame.assign(split="train")


def cached_frame(shared: str) -> pd.DataFrame:
    from xray_tf import data

    index = data.load_index(os.path.join(shared, "coronahack"))
    return index.frame[index.frame["split"] == "train"]


def compare(name: str, frame: pd.DataFrame, first_epoch: bool) -> dict:
    """Both sides on ``frame``, interleaved ``--repeats`` times: their median rates and the ratio."""
    ours, theirs = [], []
    for repeat in range(FLAGS.repeats):
        ours.append(tfdata_epoch_seconds(frame, FLAGS.image_size, FLAGS.batch_size, first_epoch))
        theirs.append(torch_epoch_seconds(frame, FLAGS.image_size, FLAGS.batch_size, FLAGS.workers))
        print(f"  {name} repeat {repeat + 1}: tf.data {len(frame) / ours[-1]:.0f} img/s, "
              f"PyTorch DataLoader {len(frame) / theirs[-1]:.0f} img/s", flush=True)
    ours_rate, theirs_rate = len(frame) / statistics.median(ours), len(frame) / statistics.median(theirs)
    return {"benchmark": name, "images": len(frame), "tf.data img/s": round(ours_rate),
            "DataLoader img/s": round(theirs_rate), "ratio": round(ours_rate / theirs_rate, 2)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    print(f"{os.cpu_count()} CPU cores, {FLAGS.workers} DataLoader workers, {FLAGS.image_size} px, "
          f"batch {FLAGS.batch_size}, {FLAGS.repeats} interleaved repeats", flush=True)
    rows = [
        compare("first epoch (decode full-res)", decode_frame(FLAGS.shared, FLAGS.decode_files), True),
        compare("cached epoch (CoronaHack train)", cached_frame(FLAGS.shared), False),
    ]
    print("\n| benchmark | images | tf.data img/s | DataLoader img/s | ratio |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")


if __name__ == "__main__":
    cli.start(main)
