"""One training run, top to bottom: config -> data index -> tf.data -> Keras model -> fit -> run dir.

Everything that can be checked is checked before the run directory is created and before the
first image is decoded: the config, the dataset index (missing files, unknown labels, empty
classes) and the model (weights files, ImageNet download).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from datetime import datetime, timezone

import keras
import numpy as np
from keras import ops

from xray_tf import artifacts, data, losses, metrics, models, pipeline, synthetic
from xray_tf.config import TrainConfig

logger = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "NO --data_dir GIVEN: TRAINING ON SYNTHETIC DATA ({path}). "
    "Results say nothing about real X-rays; pass --data_dir=PATH/TO/CORONAHACK for real training."
)


def step_decay(epoch: int, initial_rate: float, factor: float, every: int) -> float:
    """Learning rate for 0-based ``epoch``: ``initial_rate * factor ** (epoch // every)``."""
    return initial_rate * factor ** (epoch // every)


class HistoryCSV(keras.callbacks.Callback):
    """Writes ``history.csv`` (one row per finished epoch, 1-based) atomically after every epoch.

    Besides Keras' logs (loss, accuracy, per-class recall, their ``val_`` twins) each row records
    the learning rate used, the epoch's wall time and the training throughput in images/s.
    """

    def __init__(self, path: str, images_per_epoch: int):
        super().__init__()
        self.path = path
        self.images_per_epoch = images_per_epoch
        self.rows: list[dict[str, float]] = []
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._epoch_start
        row = {"epoch": epoch + 1}
        row.update({key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"})
        row["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["epoch_seconds"] = round(seconds, 3)
        row["train_images_per_second"] = round(self.images_per_epoch / seconds, 2)
        self.rows.append(row)
        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        artifacts.write_text_atomic(self.path, buffer.getvalue())


def _dtype_policy(mixed_precision: str) -> str:
    if mixed_precision == "off":
        return "float32"
    if mixed_precision == "auto":
        has_gpu = any(device.startswith("gpu") for device in keras.distribution.list_devices())
        return "mixed_bfloat16" if has_gpu else "float32"
    return mixed_precision


def _jit_compile(value: str) -> str | bool:
    return {"auto": "auto", "true": True, "false": False}[value]


def _default_run_name(config: TrainConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{config.model}_{config.loss}_{config.task}_{stamp}"


def evaluate_splits(model: keras.Model, datasets: dict, class_names: tuple[str, ...]) -> dict:
    """``classification_report`` (ROC AUC included) of ``model`` on each split's unaugmented batches."""
    reports = {}
    for split, dataset in datasets.items():
        true, probabilities = [], []
        for images, one_hot in dataset.as_numpy_iterator():  # NumPy batches feed every backend
            probabilities.append(ops.convert_to_numpy(model.predict_on_batch(images)))
            true.append(np.argmax(np.asarray(one_hot), axis=-1))
        true, probabilities = np.concatenate(true), np.concatenate(probabilities)
        matrix = metrics.confusion_matrix(true, np.argmax(probabilities, axis=-1), len(class_names))
        reports[split] = metrics.classification_report(matrix, class_names, true, probabilities)
    return reports


def run(config: TrainConfig, verbose: int | str = "auto") -> str:
    """Train as ``config`` says and return the run directory holding every artifact."""
    config.validate()
    synthetic_data = config.data_dir is None
    data_dir = config.data_dir or synthetic.ensure_default_dataset()
    if synthetic_data:
        logger.warning(SYNTHETIC_WARNING.format(path=data_dir))

    index = data.load_index(data_dir, config.task, config.val_fraction, config.seed, config.extra_data)
    class_names = index.class_names
    train_counts = list(index.class_counts("train").values())
    logger.info("Data index of %s, task %s:\n%s", data_dir, config.task, index.summary())

    loss = losses.build_loss(config.loss, train_counts, config.focal_gamma, config.focal_alpha)
    class_weight = None
    if config.class_weight == "balanced":
        class_weight = dict(enumerate(losses.balanced_weights(train_counts)))

    previous_policy = keras.config.dtype_policy()
    policy = _dtype_policy(config.mixed_precision)
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(config.seed)
        model = models.build_model(
            config.model, len(class_names), config.image_size, config.weights, config.dropout, config.chexnet_weights
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)

    settings = pipeline.PipelineSettings(
        image_size=config.image_size,
        batch_size=config.batch_size,
        cache=config.cache,
        sampler=config.sampler,
        rotation_prob=config.rotation_prob,
        rotation_degrees=config.rotation_degrees,
        seed=config.seed,
    )
    datasets = pipeline.build_datasets(index.frame, len(class_names), settings)

    run_dir = artifacts.create_run_dir(config.output_dir, config.run_name or _default_run_name(config))
    logger.info("Run directory: %s", run_dir)
    artifacts.write_text_atomic(os.path.join(run_dir, "flags.txt"), config.to_flagfile())
    artifacts.write_json_atomic(os.path.join(run_dir, "classes.json"), list(class_names))

    decode_seconds = pipeline.fill_caches(datasets) if config.cache != "none" else 0.0

    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=loss,
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")]
        + [metrics.ClassRecall(i, name=f"recall_{metrics.metric_suffix(c)}") for i, c in enumerate(class_names)],
        jit_compile=_jit_compile(config.jit_compile),
    )
    checkpoint_path = os.path.join(run_dir, "model.keras")
    num_train = len(index.split("train"))
    callbacks = [
        keras.callbacks.LearningRateScheduler(
            lambda epoch: step_decay(epoch, config.learning_rate, config.lr_decay, config.lr_decay_epochs)
        ),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(checkpoint_path, monitor="val_loss", mode="min", save_best_only=True),
        HistoryCSV(os.path.join(run_dir, "history.csv"), num_train),
    ]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    fit_start = time.perf_counter()
    history = model.fit(
        datasets.train,
        validation_data=datasets.evaluation["val"],
        epochs=config.epochs,
        class_weight=class_weight,
        shuffle=False,  # the tf.data pipeline shuffles and samples
        callbacks=callbacks,
        verbose=verbose,
    )
    fit_seconds = time.perf_counter() - fit_start

    best = models.load_model(checkpoint_path)
    val_losses = history.history["val_loss"]
    best_epoch = int(np.nanargmin(val_losses)) + 1
    artifacts.export_saved_model(best, os.path.join(run_dir, "saved_model"))
    report = {
        "synthetic_data": synthetic_data,
        "data_dir": os.path.abspath(data_dir),
        "task": config.task,
        "classes": list(class_names),
        "images": {split: index.class_counts(split) for split in data.SPLITS},
        "excluded_rows": index.excluded,
        "model_selection": {"monitor": "val_loss", "best_epoch": best_epoch, "epochs_run": len(val_losses)},
        "dtype_policy": policy,
        "seconds": {"decode_and_cache": round(decode_seconds, 2), "fit": round(fit_seconds, 2)},
        "splits": evaluate_splits(best, datasets.evaluation, class_names),
    }
    artifacts.write_json_atomic(os.path.join(run_dir, "metrics.json"), report)
    summary = ", ".join(f"{split} accuracy {r['accuracy']:.3f}" for split, r in report["splits"].items())
    logger.info("Best epoch %d of %d (by val_loss): %s", best_epoch, len(val_losses), summary)
    if synthetic_data:
        logger.warning(SYNTHETIC_WARNING.format(path=data_dir))
    return run_dir
