"""Where a training epoch's time goes: the model's steps, Keras' per-step host work, or the input pipeline.

``fit`` on the CoronaHack TRAIN split as in a training run (balanced sampling, flips,
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

    python -m benchmarks.fit_overhead --models=tiny                      # the host floor, any machine
    KERAS_BACKEND=jax python3 -m benchmarks.fit_overhead --data_dir=DATA --precision=bfloat16 \
        --profile_dir=OUT/profile                                        # on the GPU
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
from typing import TYPE_CHECKING

from absl import app, flags

from xray_tf import cli
from xray_tf.backbones import MODELS  # standard library only: --help stays fast

if TYPE_CHECKING:
    import keras

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEEDS = ("resident", "pipeline", "resident")  # resident twice: drift shows as a difference

flags.DEFINE_string("data_dir", os.path.join(REPO_ROOT, "..", "shared", "data", "coronahack"), "The CoronaHack folder.")
flags.DEFINE_string("model", "resnet50", "The network a run trains: a name of xray_tf.backbones.BACKBONES.")
flags.DEFINE_list("models", ["model", "tiny"], "Which of 'model' (--model) and 'tiny' to time.")
flags.DEFINE_integer("image_size", 224, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"], "float32, or mixed precision with this.")
flags.DEFINE_integer("epochs", 4, "Epochs per model and feed; the first is left out.")
flags.DEFINE_integer("steps", 0, "Steps per epoch (0: a whole epoch of the split).")
flags.DEFINE_string("profile_dir", None, "Trace one more pipeline epoch of the first model here (JAX).")
flags.register_validator("models", lambda names: set(names) <= {"model", "tiny"},
                         "expected names among 'model' and 'tiny'.")
FLAGS = flags.FLAGS


def tiny_model(image_size: int, num_classes: int) -> keras.Model:
    """Almost no device work per step: what remains of a step's time is host work.

    It looks at the central 8 x 8 pixels only, since casting and averaging a whole batch of
    full-size images is device work that XLA:CPU, on a machine without a GPU, would make look like
    host work.
    """
    import keras

    inputs = keras.Input((image_size, image_size, 1), dtype="uint8")
    margin = (image_size - 8) // 2
    center = keras.layers.Cropping2D(((margin, image_size - 8 - margin), (margin, image_size - 8 - margin)))(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(center))
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(pooled)
    return keras.Model(inputs, outputs, name="tiny")


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
        thread = names.get((pid, tid), tid)
        print(f"| {process} | {thread} | {busy / 1e6:.2f} | {100 * busy / window:.0f} | {longest} |")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import keras  # Keras, TensorFlow and xray_tf after flag parsing, so that --help is fast
    import tensorflow as tf

    from benchmarks import timing
    from xray_tf import data, models, pipeline

    if FLAGS.model not in MODELS:
        raise app.UsageError(f"--model={FLAGS.model}: not one of {', '.join(MODELS)}")
    if FLAGS.profile_dir and keras.backend.backend() != "jax":
        raise app.UsageError("--profile_dir traces with jax.profiler: run with KERAS_BACKEND=jax")

    index = data.load_index(FLAGS.data_dir)
    settings = pipeline.PipelineSettings(image_size=FLAGS.image_size, batch_size=FLAGS.batch_size)
    datasets = pipeline.build_datasets(index.frame, len(index.class_names), settings)
    print(f"decoding {len(index.frame)} images ...", flush=True)
    pipeline.fill_caches(datasets)
    steps = FLAGS.steps or datasets.steps_per_epoch
    epochs = FLAGS.epochs
    first_batch = next(iter(datasets.epochs(0, 1)))
    feeds = {"pipeline": lambda: datasets.epochs(0, epochs),
             "resident": lambda: tf.data.Dataset.from_tensors(first_batch).repeat(steps * epochs)}
    if FLAGS.precision != "float32":
        keras.config.set_dtype_policy(f"mixed_{FLAGS.precision}")
    rows = []
    for position, which in enumerate(FLAGS.models):
        model = (models.build_model(FLAGS.model, len(index.class_names), FLAGS.image_size, "none", 0.0, None)
                 if which == "model" else tiny_model(FLAGS.image_size, len(index.class_names)))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
        for feed_name in FEEDS:
            seconds = timing.timed_fit(model, feeds[feed_name](), steps, epochs)
            median = statistics.median(seconds[1:])
            print(f"{model.name} {feed_name}: epochs {' '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
            rows.append((model.name, feed_name, median, 1000 * median / steps, steps * FLAGS.batch_size / median))
        if FLAGS.profile_dir and position == 0:
            import jax

            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # tracing every Python call would slow the host loop it measures
            with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True, profiler_options=options):
                timing.timed_fit(model, feeds["pipeline"](), steps, 1)
            summarise_trace(FLAGS.profile_dir)
    print(f"\n{keras.backend.backend()} backend, {FLAGS.image_size} px, batch {FLAGS.batch_size}, {FLAGS.precision}, "
          f"{steps} steps per epoch, median of epochs 2-{epochs}\n")
    print("| model | feed | epoch s | ms per step | img/s |\n|---|---|---|---|---|")
    for name, feed_name, median, per_step, rate in rows:
        print(f"| {name} | {feed_name} | {median:.2f} | {per_step:.1f} | {rate:.0f} |")


if __name__ == "__main__":
    cli.start(main)
