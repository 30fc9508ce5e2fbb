"""Scale: the input pipeline over 10k to 100k+ images with ``--cache=DIR``, its speed and its memory.

Users who outgrow CoronaHack bring 100,000 images or more; at 224 px their uint8 cache is ~5 GB, so
it lives in a memory-mapped file (``--cache=DIR``) rather than in RAM. For each size this script
writes that many distinct synthetic grey JPEGs (224 px, once, reused by later runs), then in a
fresh process per size:

- the decode pass training makes before its first epoch (``image_cache.decode_images`` into the
  cache directory): images/s;
- one cached training epoch (class-balanced draw, flips, rotation, batches of 32, each batch's
  ``.numpy()`` read): images/s, the epoch's tracing included;
- memory, sampled every 50 ms from ``/proc/self/status``: the peak of the process's private memory
  (``RssAnon``: what the pipeline itself holds) and the peak resident set (``VmHWM``), which also
  counts the cache file's pages while they are mapped in (the kernel can drop those at any time).

It prints one row per size and the slope of each peak per 1,000 images between the smallest and
the largest size, against the cache's own 49 KB per image.

    python -m benchmarks.scale --sizes=10000,30000,100000 --work_dir=/tmp/xray_scale
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
from absl import flags

from xray_tf import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_list("sizes", ["10000", "30000", "100000"], "Numbers of images, one measurement each.")
flags.DEFINE_string("work_dir", "/tmp/xray_scale", "Where the synthetic images and the caches go (~6 GB at 100k).")
flags.DEFINE_integer("image_size", 224, "Image side in pixels, of the files and of the cache.")
flags.DEFINE_integer("batch_size", 32, "Batch size of the epoch.")
flags.DEFINE_integer("child", None, "Set by this script for the process it starts: measure this many images.")
FLAGS = flags.FLAGS

_CLASSES = 4


def _write_images(args: tuple[str, int, int, int]) -> None:
    """Files ``first..stop`` of the synthetic set: a smooth random field plus noise, each one different."""
    from PIL import Image

    folder, first, stop, size = args
    rng = np.random.default_rng(first)
    grid = np.linspace(0, 1, size, dtype=np.float32)
    for i in range(first, stop):
        fx, fy, phase = rng.uniform(1, 6, 3)
        field = np.sin(fx * grid[:, None] * np.pi + phase) * np.cos(fy * grid[None, :] * np.pi)
        pixels = 128 + 80 * field + rng.normal(0, 12, (size, size))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(
            os.path.join(folder, f"{i:07d}.jpeg"), quality=90)


def synthetic_frame(count: int) -> pd.DataFrame:
    """The first ``count`` files of the shared synthetic set (written where missing), as an index frame."""
    folder = os.path.join(FLAGS.work_dir, f"images_{FLAGS.image_size}px")
    os.makedirs(folder, exist_ok=True)
    missing = [i for i in range(count) if not os.path.exists(os.path.join(folder, f"{i:07d}.jpeg"))]
    if missing:
        print(f"writing {len(missing)} synthetic images to {folder}", flush=True)
        chunks = [(folder, start, min(start + 1000, count), FLAGS.image_size)
                  for start in range(missing[0], count, 1000)]
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_images, chunks))
    labels = np.random.default_rng(0).choice(_CLASSES, count, p=[0.25, 0.45, 0.28, 0.02])  # CoronaHack-like
    return pd.DataFrame({"path": [os.path.join(folder, f"{i:07d}.jpeg") for i in range(count)],
                         "label_index": labels.astype("int64"), "split": "train"})


class MemoryPeaks:
    """The peaks of ``RssAnon`` and ``VmHWM`` (MB) of this process, sampled on a thread every 50 ms."""

    def __init__(self):
        self.private_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def status_mb(field: str) -> float:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise KeyError(field)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.private_mb = max(self.private_mb, self.status_mb("RssAnon"))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_private_mb": self.private_mb, "peak_resident_mb": self.status_mb("VmHWM")}


def measure(count: int) -> dict:
    """In the child: the decode pass and one cached epoch over ``count`` images, with the memory peaks."""
    from xray_tf import image_cache, pipeline

    frame = synthetic_frame(count)
    cache_dir = os.path.join(FLAGS.work_dir, f"cache_{count}")
    os.makedirs(cache_dir, exist_ok=True)
    for name in os.listdir(cache_dir):  # the decode pass must decode, not reuse an earlier run's cache
        os.remove(os.path.join(cache_dir, name))
    peaks = MemoryPeaks()
    settings = pipeline.PipelineSettings(image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, cache=cache_dir)
    start = time.perf_counter()
    decoded = image_cache.decode_images(frame["path"], FLAGS.image_size, cache_dir, log_every_s=30)
    decode_seconds = time.perf_counter() - start
    datasets = pipeline.build_datasets(frame, _CLASSES, settings)
    pipeline.fill_caches(datasets, decoded)
    start = time.perf_counter()
    for images, _ in datasets.epochs(0, 1):
        images.numpy()
    epoch_seconds = time.perf_counter() - start
    cache_mb = sum(os.path.getsize(os.path.join(cache_dir, name)) for name in os.listdir(cache_dir)) / 2**20
    return {"images": count, "decode_img_s": count / decode_seconds,
            "epoch_img_s": datasets.images_per_epoch / epoch_seconds, "cache_mb": cache_mb, **peaks.stop()}


def main(argv: list[str]) -> None:
    if FLAGS.child is not None:
        print(json.dumps(measure(FLAGS.child)), flush=True)
        return
    sizes = sorted(int(size) for size in FLAGS.sizes)
    synthetic_frame(sizes[-1])  # all files first, so that writing them is in no measurement
    rows = []
    for count in sizes:
        command = [sys.executable, "-m", "benchmarks.scale", f"--child={count}", f"--work_dir={FLAGS.work_dir}",
                   f"--image_size={FLAGS.image_size}", f"--batch_size={FLAGS.batch_size}"]
        result = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print("\n| images | decode img/s | cached epoch img/s | cache MB | peak private MB | peak resident MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']} | {row['decode_img_s']:.0f} | {row['epoch_img_s']:.0f} | {row['cache_mb']:.0f} "
              f"| {row['peak_private_mb']:.0f} | {row['peak_resident_mb']:.0f} |")
    if len(rows) > 1:
        span = (rows[-1]["images"] - rows[0]["images"]) / 1000
        for key in ("peak_private_mb", "peak_resident_mb", "cache_mb"):
            print(f"slope of {key}: {(rows[-1][key] - rows[0][key]) / span:.2f} MB per 1,000 images")


if __name__ == "__main__":
    cli.start(main)
