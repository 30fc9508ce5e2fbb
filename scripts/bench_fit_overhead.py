"""Where a training epoch's time goes: the model's steps, Keras' per-step host work, or the input pipeline.

``fit`` on the CoronaHack TRAIN split, as ``xray_tf.train`` runs it (balanced sampling, flips,
rotation, batches of uint8 images, Adam, cross-entropy), timed per epoch, for two models and two
feeds:

- model ``MODEL`` (``--model``): the network a run trains; ``tiny``: rescale, global average pool
  and a 4-way dense layer, so its steps do almost no device work;
- feed ``pipeline``: the training pipeline's batches (``Datasets.epochs``); ``resident``: its first
  batch repeated by tf.data, so each step still goes through Keras' tf.data-to-device path but
  nothing is sampled, gathered or augmented.

Reading the table (median epoch after the first, which compiles; validation is left out):

- ``MODEL``/``resident`` ~ ``MODEL``/``pipeline``: the pipeline keeps up; slower with the pipeline:
  the host's cores cannot feed the device and train at once.
- ``tiny``/``resident`` is the floor every step pays on the host (fit's loop, callbacks, the batch's
  conversion and copy to the device); ``tiny``/``pipeline`` adds the pipeline. When the floor is
  near ``MODEL``/``resident``, the host, not the device, sets the pace.

With ``--profile_dir`` (JAX backend) one more pipeline epoch of the first model is traced with
``jax.profiler`` and summarised: how much of the epoch each thread and each device stream was busy,
and what kept the busiest ones busy. The trace stays in the folder for TensorBoard or Perfetto.

    python scripts/bench_fit_overhead.py --models=tiny                      # the host floor, any machine
    KERAS_BACKEND=jax python3 scripts/bench_fit_overhead.py --data_dir=DATA --precision=bfloat16 \
        --profile_dir=OUT/profile                                           # on the GPU
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's xray_tf

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from xray_tf import data, models, pipeline  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EpochClock(keras.callbacks.Callback):
    """Wall seconds of each epoch; Keras reads the epoch's logs at its end, so device work is included."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def tiny_model(image_size: int, num_classes: int) -> keras.Model:
    """Almost no device work per step: what remains of a step's time is host work.

    It looks at the central 8 x 8 pixels only: even casting and averaging a whole batch of 224 px
    images takes ~6 ms on XLA:CPU, which would pass for host work on a machine without a GPU.
    """
    inputs = keras.Input((image_size, image_size, 1), dtype="uint8")
    margin = (image_size - 8) // 2
    center = keras.layers.Cropping2D(((margin, image_size - 8 - margin), (margin, image_size - 8 - margin)))(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(center))
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(pooled)
    return keras.Model(inputs, outputs, name="tiny")


def timed_fit(model: keras.Model, feed: tf.data.Dataset, steps: int, epochs: int) -> list[float]:
    clock = EpochClock()
    model.fit(feed, steps_per_epoch=steps, epochs=epochs, shuffle=False, verbose=0, callbacks=[clock])
    return clock.seconds


def _busy_microseconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: nested or overlapping events count once."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarise_trace(profile_dir: str, top: int = 5) -> None:
    """Print each busy thread's share of the traced window and, for device threads, their longest events."""
    path = max(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")),
               key=os.path.getmtime)
    with gzip.open(path) as handle:
        events = json.load(handle)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {(event["pid"], event.get("tid")): event["args"]["name"] for event in events
             if event.get("ph") == "M" and event.get("name") in ("process_name", "thread_name")}
    spans = [event for event in events if event.get("ph") == "X" and "dur" in event]
    window = max(e["ts"] + e["dur"] for e in spans) - min(e["ts"] for e in spans)
    by_thread = collections.defaultdict(list)
    for event in spans:
        by_thread[event["pid"], event["tid"]].append(event)
    print(f"\ntrace {path}: {window / 1e6:.2f} s\n\n| process | thread | busy s | busy % | longest events (total ms) |")
    print("|---|---|---|---|---|")
    for (pid, tid), thread_events in sorted(by_thread.items()):
        busy = _busy_microseconds([(e["ts"], e["ts"] + e["dur"]) for e in thread_events])
        if busy < 0.01 * window:
            continue
        process = names.get((pid, None), str(pid))
        longest = ""
        if "host" not in process.lower():  # a device's streams and lines: what they ran
            totals = collections.Counter()
            for event in thread_events:
                totals[event["name"]] += event["dur"]
            longest = "; ".join(f"{name[:60]} ({duration / 1e3:.0f})" for name, duration in totals.most_common(top))
        print(f"| {process} | {names.get((pid, tid), tid)} | {busy / 1e6:.2f} | {100 * busy / window:.0f} | {longest} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "..", "shared", "data", "coronahack"))
    parser.add_argument("--model", default="resnet50", choices=sorted(models.NORMALIZATION_BY_MODEL))
    parser.add_argument("--models", default="model,tiny", help="which of 'model' (--model) and 'tiny' to time")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--epochs", type=int, default=4, help="per model and feed; the first is left out")
    parser.add_argument("--steps", type=int, default=0, help="steps per epoch (0: a whole epoch of the split)")
    parser.add_argument("--profile_dir", help="trace one more pipeline epoch of the first model here (JAX)")
    args = parser.parse_args()
    if args.profile_dir and keras.backend.backend() != "jax":
        parser.error("--profile_dir traces with jax.profiler: run with KERAS_BACKEND=jax")

    index = data.load_index(args.data_dir)
    settings = pipeline.PipelineSettings(image_size=args.image_size, batch_size=args.batch_size)
    datasets = pipeline.build_datasets(index.frame, len(index.class_names), settings)
    print(f"decoding {len(index.frame)} images ...", flush=True)
    pipeline.fill_caches(datasets)
    steps = args.steps or datasets.steps_per_epoch
    first_batch = next(iter(datasets.epochs(0, 1)))
    feeds = {"pipeline": lambda: datasets.epochs(0, args.epochs),
             "resident": lambda: tf.data.Dataset.from_tensors(first_batch).repeat(steps * args.epochs)}
    if args.precision != "float32":
        keras.config.set_dtype_policy(f"mixed_{args.precision}")
    rows = []
    for position, which in enumerate(args.models.split(",")):
        model = (models.build_model(args.model, len(index.class_names), args.image_size, "none", 0.0, None)
                 if which == "model" else tiny_model(args.image_size, len(index.class_names)))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
        for feed_name in ("resident", "pipeline", "resident"):  # resident twice: drift shows as a difference
            seconds = timed_fit(model, feeds[feed_name](), steps, args.epochs)
            median = statistics.median(seconds[1:])
            print(f"{model.name} {feed_name}: epochs {' '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
            rows.append((model.name, feed_name, median, 1000 * median / steps, steps * args.batch_size / median))
        if args.profile_dir and position == 0:
            import jax

            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # tracing every Python call would slow the host loop it measures
            with jax.profiler.trace(args.profile_dir, create_perfetto_trace=True, profiler_options=options):
                timed_fit(model, feeds["pipeline"](), steps, 1)
            summarise_trace(args.profile_dir)
    print(f"\n{keras.backend.backend()} backend, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"{steps} steps per epoch, median of epochs 2-{args.epochs}\n")
    print("| model | feed | epoch s | ms per step | img/s |\n|---|---|---|---|---|")
    for name, feed_name, median, per_step, rate in rows:
        print(f"| {name} | {feed_name} | {median:.2f} | {per_step:.1f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
