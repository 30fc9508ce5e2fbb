"""Input pipeline throughput: xray_tf's tf.data pipeline against a PyTorch DataLoader doing the same work.

Both sides draw a class-balanced epoch, flip horizontally and vertically with p=0.5 each, rotate
within +-15 degrees with p=0.3 (bilinear) and deliver uint8 batches to a loop that calls
``.numpy()`` on each. Sampling: the DataLoader uses ``WeightedRandomSampler`` with reciprocal-count
weights, with replacement; ours picks each row's class with the same equal probabilities and draws
without replacement within a class (a cost of microseconds an epoch either way). The DataLoader
has --workers workers (persistent, so later epochs reuse them); tf.data uses AUTOTUNE on the same
cores. The sides run interleaved (ours, theirs, ours, ...) so that drifting machine load hits
both; the script reports the median rates and the median of each repeat's ratio, with its range.

Three comparisons:
* first epoch: ``../shared/data/fullres`` (40 full-resolution JPEG/PNG files of 440-2500 px, grey
  and RGB) repeated to --decode_files paths, each side started cold: ours, the one
  decode+check+cache pass that training makes before its first epoch, then one epoch; theirs, a
  new DataLoader's first epoch (worker start included), decoding and resizing with PIL;
* cached epoch against decoding: the CoronaHack TRAIN split at --image_size; ours reads its uint8
  cache, the DataLoader decodes and resizes every file every epoch (what it does without extra code);
* cached epoch against a cached DataLoader: the same, but the DataLoader indexes the very uint8
  array our decode pass produced (shared with its forked workers), so both sides do only
  sampling, augmentation and batching.
In both cached comparisons each side runs one untimed epoch first (ours: tracing; theirs: worker
start), then one timed epoch.

    python -m benchmarks.pipeline --repeats=3
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from absl import app, flags

from xray_tf import cli

if TYPE_CHECKING:
    from xray_tf.image_cache import DecodedImages

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("shared", os.path.join(REPO_ROOT, "..", "shared", "data"),
                    "The folder holding fullres/ and coronahack/.")
flags.DEFINE_integer("image_size", 224, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("workers", os.cpu_count(), "DataLoader workers.")
flags.DEFINE_integer("decode_files", 320, "Paths in the first-epoch measurement (fullres/ repeated).")
flags.DEFINE_integer("repeats", 3, "Interleaved repeats per side.")
FLAGS = flags.FLAGS


def tfdata_epoch_seconds(frame: pd.DataFrame, image_size: int, batch_size: int,
                         decoded: DecodedImages | None) -> float:
    """Seconds for one epoch of xray_tf's pipeline; without ``decoded``, the decode pass is timed too.

    The decode pass is the one a training run makes: every file decoded once, checked and kept as the
    in-memory cache (``image_cache.decode_images``, as ``preflight.prepare_data`` calls it).
    """
    from xray_tf import image_cache, pipeline

    settings = pipeline.PipelineSettings(image_size=image_size, batch_size=batch_size, cache="memory")
    datasets = pipeline.build_datasets(frame, int(frame["label_index"].max()) + 1, settings)
    if decoded is not None:  # cached: a warm-up epoch traces the augmentation outside the clock
        pipeline.fill_caches(datasets, decoded)
        for _ in datasets.epochs(0, 1):
            pass
    start = time.perf_counter()
    if decoded is None:
        pipeline.fill_caches(datasets, image_cache.decode_images(frame["path"], image_size, "memory", log_every_s=1e9))
    for images, _ in datasets.epochs(1, 2):
        images.numpy()
    return time.perf_counter() - start


def _augmented(image):
    """The pipeline's flips (p=0.5 each) and rotation (p=0.3, +-15 degrees, bilinear) on a PIL image.

    Python's random module: the DataLoader reseeds it in every worker (NumPy's it does not).
    """
    from PIL import Image

    if random.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if random.random() < 0.5:
        image = image.transpose(Image.FLIP_TOP_BOTTOM)
    if random.random() < 0.3:
        image = image.rotate(random.uniform(-15, 15), resample=Image.BILINEAR)
    return image


def torch_epoch_seconds(frame: pd.DataFrame, image_size: int, batch_size: int, workers: int,
                        cached: np.ndarray | None, warm: bool) -> float:
    """Seconds for one DataLoader epoch, decoding every file or indexing ``cached`` (``frame``'s rows in order).

    ``warm``: the timed epoch is the second of two on persistent workers; else the DataLoader is new
    and its workers start inside the clock, as in a run's first epoch.
    """
    import torch
    from PIL import Image

    class XrayImages(torch.utils.data.Dataset):
        def __init__(self, paths: list[str], labels: list[int]):
            self.paths, self.labels = paths, labels

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int):
            if cached is None:
                image = Image.open(self.paths[i]).convert("L").resize((image_size, image_size), Image.BILINEAR)
            else:
                image = Image.fromarray(cached[i, :, :, 0])
            return torch.from_numpy(np.asarray(_augmented(image))[:, :, None].copy()), self.labels[i]

    labels = frame["label_index"].to_numpy()
    weights = 1.0 / np.bincount(labels)[labels]
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(frame), replacement=True)
    loader = torch.utils.data.DataLoader(
        XrayImages(list(frame["path"]), list(labels)), batch_size=batch_size, sampler=sampler,
        num_workers=workers, persistent_workers=workers > 0,
    )
    if warm:
        for _ in loader:
            pass
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


def compare(name: str, frame: pd.DataFrame, ours: Callable[[], float], theirs: Callable[[], float]) -> dict:
    """``ours()`` and ``theirs()`` (epoch seconds over ``frame``) interleaved: median rates, ratios per pair.

    The ratio is the median of each repeat's own ratio, so that load drifting between repeats (the
    machine is shared) cancels within each pair of neighbouring measurements.
    """
    our_rates, their_rates = [], []
    for repeat in range(FLAGS.repeats):
        our_rates.append(len(frame) / ours())
        their_rates.append(len(frame) / theirs())
        print(f"  {name} repeat {repeat + 1}: tf.data {our_rates[-1]:.0f} img/s, "
              f"PyTorch DataLoader {their_rates[-1]:.0f} img/s", flush=True)
    ratios = [mine / other for mine, other in zip(our_rates, their_rates)]
    return {"benchmark": name, "images": len(frame),
            "tf.data img/s": f"{statistics.median(our_rates):.0f} ({'/'.join(f'{r:.0f}' for r in our_rates)})",
            "DataLoader img/s": f"{statistics.median(their_rates):.0f} ({'/'.join(f'{r:.0f}' for r in their_rates)})",
            "ratio": f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from xray_tf import image_cache

    size, batch, workers = FLAGS.image_size, FLAGS.batch_size, FLAGS.workers
    print(f"{os.cpu_count()} CPU cores, {workers} DataLoader workers, {size} px, batch {batch}, "
          f"{FLAGS.repeats} interleaved repeats", flush=True)
    full = decode_frame(FLAGS.shared, FLAGS.decode_files)
    train = cached_frame(FLAGS.shared)
    decoded = image_cache.decode_images(train["path"], size, "memory", log_every_s=1e9)
    rows = [
        compare("first epoch (decode full-res)", full, lambda: tfdata_epoch_seconds(full, size, batch, None),
                lambda: torch_epoch_seconds(full, size, batch, workers, None, warm=False)),
        compare("cached epoch vs DataLoader decoding", train,
                lambda: tfdata_epoch_seconds(train, size, batch, decoded),
                lambda: torch_epoch_seconds(train, size, batch, workers, None, warm=True)),
        compare("cached epoch vs cached DataLoader", train,
                lambda: tfdata_epoch_seconds(train, size, batch, decoded),
                lambda: torch_epoch_seconds(train, size, batch, workers, decoded.images, warm=True)),
    ]
    print("\n| benchmark | images | tf.data img/s (repeats) | DataLoader img/s (repeats) | ratio (range) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")


if __name__ == "__main__":
    cli.start(main)
