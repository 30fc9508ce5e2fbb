"""One training run, top to bottom: ``run`` = prepare -> build -> fit -> finish.

Everything that can be checked is checked before the run directory is created and before the
first epoch: the config, the dataset index (missing files, unknown labels, empty classes), every
image (decoded once, see ``preflight.prepare_data``) and the model (weights files, ImageNet download).

A run survives being killed: after every epoch the training state is backed up atomically
(``callbacks.EpochBackup``), and ``resume=True`` continues from the last finished epoch with the
batches the uninterrupted run would have seen (the pipeline replays epoch e from the seed and e),
so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import keras

from xray_tf import (
    calibration,
    callbacks,
    checkpoint,
    compile_cache,
    data,
    distribution,
    evaluate,
    export,
    inference,
    losses,
    metrics,
    models,
    pipeline,
    preflight,
    rundir,
)
from xray_tf.config import TrainConfig

logger = logging.getLogger(__name__)

def step_decay(epoch: int, initial_rate: float, factor: float, every: int) -> float:
    """Learning rate for 0-based ``epoch``: ``initial_rate * factor ** (epoch // every)``."""
    return initial_rate * factor ** (epoch // every)


def run(config: TrainConfig, verbose: int | str = "auto",
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> str | None:
    """Train as ``config`` says and return the run directory holding every artifact.

    With ``config.resume`` the run directory ``output_dir/run_name`` of an unfinished run is
    continued after its last backed-up epoch; otherwise a new directory is created. With
    ``distribution="multi_worker"`` only the chief worker writes that directory; the other workers
    train their share and return None. ``callbacks`` are passed to ``fit`` after the run's own.
    """
    config.validate()
    with distribution.activate(config.distribution) as setup:  # before TensorFlow or JAX does anything
        prepared = _prepare(config, setup)
        model = _build(config, prepared, setup)
        trained = _fit(config, prepared, model, setup, verbose, list(callbacks))
    # The best model is rebuilt outside the distribution: one device evaluates every image.
    return _finish(config, prepared, trained) if trained else None


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What ``_prepare`` leaves for building and fitting the model."""

    data: preflight.PreparedData
    datasets: pipeline.Datasets
    resumed_dir: str | None  # the unfinished run to continue
    learning_rate: float  # after scaling by the replica count, if asked
    dtype_policy: str
    distribution: dict  # as metrics.json records it
    compilation_cache: str | None
    decode_seconds: float


def _prepare(config: TrainConfig, setup: distribution.Setup) -> _Prepared:
    """Check everything that can fail before training, decode the data and build its datasets."""
    setup.check_batch_size(config.batch_size)
    compilation_cache = compile_cache.enable(config.compilation_cache)  # before the first XLA compilation
    resumed_dir = _run_to_resume(config) if config.resume else None  # before the long image check
    prepared = preflight.prepare_data(config)
    logger.info("%s", setup.describe(config.batch_size))
    learning_rate = config.learning_rate * (setup.replicas if config.scale_lr_with_batch else 1)
    if config.scale_lr_with_batch:
        logger.info("--scale_lr_with_batch: learning rate %g x %d replicas = %g", config.learning_rate,
                    setup.replicas, learning_rate)
    settings = pipeline.PipelineSettings(
        image_size=config.image_size,
        batch_size=config.batch_size,
        cache=config.cache,
        sampler=config.sampler,
        rotation_prob=config.rotation_prob,
        rotation_degrees=config.rotation_degrees,
        seed=config.seed,
    )
    datasets = pipeline.build_datasets(prepared.index.frame, len(prepared.index.class_names), settings)
    decode_seconds = pipeline.fill_caches(datasets, prepared.decoded)  # the images preflight decoded
    devices = {"name": setup.name, "replicas": setup.replicas, "workers": setup.workers, "learning_rate": learning_rate}
    return _Prepared(prepared, datasets, resumed_dir, learning_rate, _dtype_policy(config.mixed_precision), devices,
                     compilation_cache, decode_seconds)


def _build(config: TrainConfig, prepared: _Prepared, setup: distribution.Setup) -> keras.Model:
    """The compiled model, its variables (optimizer's and metrics' too) in the distribution."""
    class_names = prepared.data.index.class_names
    train_counts = list(prepared.data.index.class_counts("train").values())
    with models.global_dtype_policy(prepared.dtype_policy), setup.scope():
        keras.utils.set_random_seed(config.seed)
        model = models.build_model(config.model, len(class_names), config.image_size, config.weights,
                                   config.dropout, config.chexnet_weights)
        model.compile(
            optimizer=keras.optimizers.Adam(prepared.learning_rate),
            loss=losses.build_loss(config.loss, train_counts, config.focal_gamma, config.focal_alpha),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")]
            + [metrics.ClassRecall(i, name=f"recall_{metrics.metric_suffix(c)}") for i, c in enumerate(class_names)],
            jit_compile=_jit_compile(config.jit_compile),
        )
        setup.prepare_model(model)
    return model


@dataclasses.dataclass(frozen=True)
class _Trained:
    """What ``_fit`` leaves the chief for ``_finish``."""

    run_dir: str
    initial_epoch: int
    best_epoch: int
    epochs_run: int
    model_config: dict  # the trained model, serialized: rebuilt on one device for the best epoch
    fit_seconds: float


def _fit(config: TrainConfig, prepared: _Prepared, model: keras.Model, setup: distribution.Setup,
         verbose: int | str, extra_callbacks: list[keras.callbacks.Callback]) -> _Trained | None:
    """Fit on every worker; the chief also writes the run directory. None on the other workers."""
    run_dir = prepared.resumed_dir or (_create_run_dir(config, prepared.data) if setup.is_chief else None)
    backup_dir = os.path.join(run_dir, rundir.BACKUP) if run_dir else None
    with setup.scope():
        initial_epoch = checkpoint.restore_backup(model, backup_dir) if backup_dir else 0
    if prepared.resumed_dir:
        logger.info("Resuming %s after epoch %d of %d", run_dir, initial_epoch, config.epochs)
    fit_callbacks = [
        keras.callbacks.LearningRateScheduler(
            lambda epoch: step_decay(epoch, prepared.learning_rate, config.lr_decay, config.lr_decay_epochs)),
        callbacks.StopOnNonFiniteLoss(),  # before the callbacks that keep an epoch
    ]
    backup = None
    if setup.is_chief:  # the others write nothing
        kept_rows = callbacks.HistoryCSV.resumed_rows(run_dir, initial_epoch)
        finite = [(row["val_loss"], row["epoch"]) for row in kept_rows if math.isfinite(row.get("val_loss", math.nan))]
        backup = callbacks.EpochBackup(backup_dir, *min(finite, default=(math.inf, None)))
        fit_callbacks += [callbacks.HistoryCSV(run_dir, prepared.datasets.images_per_epoch, kept_rows),
                          backup]  # last: an epoch is backed up only once its history row exists
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    start = time.perf_counter()
    history = fit_epochs(model, prepared.datasets, initial_epoch, config.epochs, setup,
                         validation_data=setup.evaluation_data(prepared.datasets, "val"),
                         class_weight=_class_weight(config, prepared.data.index),
                         callbacks=fit_callbacks + extra_callbacks, verbose=verbose if setup.is_chief else 0)
    fit_seconds = time.perf_counter() - start
    epochs_run = history.epoch[-1] + 1 if history and history.epoch else initial_epoch
    if model.stop_training:  # only StopOnNonFiniteLoss stops a fit early
        raise FloatingPointError(
            f"Training stopped in epoch {epochs_run}: the loss became NaN or infinite. Lower --learning_rate "
            f"(it is {prepared.learning_rate:g}) or check the data."
            + (f" {run_dir} is left unfinished; its {rundir.HISTORY} shows the epochs before." if run_dir else ""))
    if not setup.is_chief:
        return None
    if backup.best_epoch is None:
        raise FloatingPointError(f"No epoch had a finite validation loss, so there is no model to keep. Lower "
                                 f"--learning_rate (it is {prepared.learning_rate:g}) or check the data.")
    with models.portable_batch_norm(model):  # rebuilt on one device
        model_config = keras.saving.serialize_keras_object(model)
    return _Trained(run_dir, initial_epoch, backup.best_epoch, epochs_run, model_config, fit_seconds)


def fit_epochs(model: keras.Model, datasets: pipeline.Datasets, first: int, stop: int,
               setup: distribution.Setup = distribution.ONE_DEVICE, **fit_args) -> keras.callbacks.History | None:
    """``model.fit`` on epochs ``first`` to ``stop - 1`` (0-based) of ``datasets``.

    Each epoch gets the batches it would get in a run started at epoch 0, so a run resumed at
    ``first`` continues exactly as the uninterrupted run. Under a distribution ``setup`` each
    worker feeds its share of those same batches. ``fit_args`` go to ``model.fit``.
    """
    if first >= stop:
        return None
    if keras.backend.backend() == "jax":
        # Build the compiled loss and metrics on a batch of their own: Keras' JAX trainer otherwise
        # builds them from a batch it draws out of the training stream, shifting every epoch by one.
        # take(1), not steps=1: the iterator ends rather than being dropped with batches in flight.
        model.evaluate(setup.evaluation_data(datasets, "train").take(1), verbose=0)
    return model.fit(setup.training_data(datasets, first, stop), steps_per_epoch=datasets.steps_per_epoch,
                     initial_epoch=first, epochs=stop, shuffle=False, **fit_args)  # the pipeline samples


def _finish(config: TrainConfig, prepared: _Prepared, trained: _Trained) -> str:
    """Keep the best epoch's model, export it, evaluate it on every split, write ``metrics.json``."""
    run_dir, index = trained.run_dir, prepared.data.index
    start = time.perf_counter()
    best = checkpoint.write_best_model(trained.model_config, prepared.dtype_policy,
                                       os.path.join(run_dir, rundir.BACKUP), trained.best_epoch,
                                       os.path.join(run_dir, rundir.MODEL))
    probabilities = {}
    for split, dataset in prepared.datasets.evaluation.items():
        batches = (images for images, _ in dataset.as_numpy_iterator())  # NumPy batches feed every backend
        probabilities[split] = inference.ensemble_probabilities([inference.keras_member(best)], batches,
                                                                config.batch_size)
    temperature = None
    if config.calibrate:  # on val, where the epoch was chosen too; never on test
        fitted = calibration.calibrate(probabilities["val"], index.split("val")["label_index"].to_numpy())
        calibration.write_calibration(run_dir, {**fitted, "fitted_on": "val", "saved_model": True})
        temperature = fitted["temperature"]
        logger.info("--calibrate: temperature %.3f lowers the val NLL from %.4f to %.4f", temperature,
                    fitted["nll"]["before"], fitted["nll"]["after"])
    export.export_saved_model(best, os.path.join(run_dir, rundir.SAVED_MODEL), temperature)
    split_reports = {}
    for split, split_probabilities in probabilities.items():
        if temperature is not None:
            split_probabilities = calibration.apply_temperature(split_probabilities, temperature)
        rows = index.split(split)
        split_reports[split] = evaluate.probability_report(split_probabilities, rows["label_index"],
                                                           index.class_names, rows["patient"].tolist())
    seconds = {"decode_and_cache": prepared.decode_seconds, "fit": trained.fit_seconds,
               "export_and_evaluate": time.perf_counter() - start}
    report = {
        "synthetic_data": prepared.data.synthetic,
        "data_dir": os.path.abspath(prepared.data.data_dir),
        "task": config.task,
        "classes": list(index.class_names),
        "images": {split: index.class_counts(split) for split in data.SPLITS},
        "patients": {split: index.patient_count(split) for split in data.SPLITS},
        "split_by": config.split_by,
        "excluded_rows": index.excluded,
        "model_selection": {"monitor": "val_loss", "best_epoch": trained.best_epoch,
                            "epochs_run": trained.epochs_run},
        "resumed_after_epoch": trained.initial_epoch if prepared.resumed_dir else None,
        "dtype_policy": prepared.dtype_policy,
        "distribution": prepared.distribution,
        "compilation_cache": prepared.compilation_cache,
        "seconds": {stage: round(value, 2) for stage, value in seconds.items()},
        "splits": split_reports,
    }
    rundir.write_json(os.path.join(run_dir, rundir.METRICS), report)
    shutil.rmtree(os.path.join(run_dir, rundir.BACKUP), ignore_errors=True)  # complete: nothing left to resume
    summary = ", ".join(f"{split} accuracy {r['accuracy']:.3f}" for split, r in split_reports.items())
    logger.info("Best epoch %d of %d (by val_loss): %s", trained.best_epoch, trained.epochs_run, summary)
    if prepared.data.synthetic:
        logger.warning(preflight.SYNTHETIC_WARNING.format(path=prepared.data.data_dir))
    return run_dir


def _create_run_dir(config: TrainConfig, prepared: preflight.PreparedData) -> str:
    """A new run directory holding the run's settings, class names and skipped files."""
    run_dir = rundir.create(config.output_dir, config.run_name or _default_run_name(config))
    logger.info("Run directory: %s", run_dir)
    # flags.txt names the directory actually created, so --flagfile=RUN/flags.txt --resume finds it.
    own_config = dataclasses.replace(config, run_name=os.path.basename(run_dir))
    rundir.write_text(os.path.join(run_dir, rundir.FLAGS), own_config.to_flagfile())
    rundir.write_json(os.path.join(run_dir, rundir.CLASSES), list(prepared.index.class_names))
    splits = prepared.index.frame[["path", "label", "split", "patient"]].rename(columns={"label": "class"})
    rundir.write_text(os.path.join(run_dir, rundir.SPLITS_CSV), splits.to_csv(index=False))
    if prepared.skipped:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(prepared.skipped.items()))
        rundir.write_text(os.path.join(run_dir, rundir.SKIPPED_IMAGES), buffer.getvalue())
    return run_dir


def _run_to_resume(config: TrainConfig) -> str:
    """The run directory ``resume`` continues, once it is known that it can and should be continued."""
    run_dir = os.path.join(config.output_dir, config.run_name)
    flags_path = os.path.join(run_dir, rundir.FLAGS)
    if not os.path.isfile(flags_path):
        raise rundir.RunError(f"--resume: {run_dir} is not a run directory (no {rundir.FLAGS} there); "
                              "nothing to resume.")
    if rundir.is_finished(run_dir):
        raise rundir.RunError(f"--resume: {run_dir} has finished (it has {rundir.METRICS}); start a new run instead.")
    changed = rundir.read_config(run_dir).changed_settings(config)
    if changed:
        listing = "; ".join(f"--{name} was {started}, now {now}" for name, (started, now) in sorted(changed.items()))
        raise rundir.RunError(f"--resume: {run_dir} was started with other settings ({listing}). A run continues "
                              f"only with its own settings: --flagfile={flags_path} --resume")
    for path in rundir.remove_temporaries(run_dir):
        logger.info("--resume: removed %s, left by a write that was killed", path)
    return run_dir


def _class_weight(config: TrainConfig, index: data.DataIndex) -> dict[int, float] | None:
    if config.class_weight == "none":
        return None
    return dict(enumerate(losses.balanced_weights(list(index.class_counts("train").values()))))


def _dtype_policy(mixed_precision: str) -> str:
    if mixed_precision == "off":
        return "float32"
    if mixed_precision == "auto":
        return "mixed_bfloat16" if preflight.has_gpu() else "float32"
    return mixed_precision


def _jit_compile(value: str) -> str | bool:
    return {"auto": "auto", "true": True, "false": False}[value]


def _default_run_name(config: TrainConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{config.model}_{config.loss}_{config.task}_{stamp}"
