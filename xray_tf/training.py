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

import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence

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
    optimizers,
    pipeline,
    preflight,
    rundir,
    tensorboard_logs,
)
from xray_tf.config import ConfigError, TrainConfig, export_formats

logger = logging.getLogger(__name__)


def run(config: TrainConfig, verbose: int | str = "auto",
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> str | None:
    """Train as ``config`` says and return the run directory holding every artifact.

    With ``config.resume`` the run directory ``output_dir/run_name`` of an unfinished run is
    continued after its last backed-up epoch; otherwise a new directory is created. With
    ``distribution="multi_worker"`` only the chief worker writes that directory; the other workers
    train their share and return None. ``callbacks`` are passed to ``fit`` after the run's own; with
    ``freeze_backbone_epochs`` there are two fits (the frozen epochs, then the rest), so they see
    ``on_train_begin`` and ``on_train_end`` twice.
    """
    config.validate()
    export.check_formats(export_formats(config.export))  # a missing package, before hours of training
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
    if config.tensorboard and (problem := tensorboard_logs.missing_package()):
        raise ConfigError("tensorboard", True, problem)
    compilation_cache = compile_cache.enable(config.compilation_cache)  # before the first XLA compilation
    resumed_dir = rundir.run_to_resume(config) if config.resume else None  # before the long image check
    for path in rundir.remove_temporaries(resumed_dir) if resumed_dir else ():
        logger.info("--resume: removed %s, left by a write that was killed", path)
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
        augment=config.augment,
        crop_scale_min=config.crop_scale_min,
        crop_aspect_max=config.crop_aspect_max,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        seed=config.seed,
    )
    datasets = pipeline.build_datasets(prepared.index.frame, len(prepared.index.class_names), settings)
    decode_seconds = pipeline.fill_caches(datasets, prepared.decoded)  # the images preflight decoded
    devices = {"name": setup.name, "replicas": setup.replicas, "workers": setup.workers, "learning_rate": learning_rate}
    dtype_policy = preflight.dtype_policy(config.mixed_precision)
    return _Prepared(prepared, datasets, resumed_dir, learning_rate, dtype_policy, devices, compilation_cache,
                     decode_seconds)


def _build(config: TrainConfig, prepared: _Prepared, setup: distribution.Setup) -> keras.Model:
    """The compiled model, its variables (optimizer's and metrics' too) in the distribution."""
    class_names = prepared.data.index.class_names
    with models.global_dtype_policy(prepared.dtype_policy), setup.scope():
        keras.utils.set_random_seed(config.seed)
        model = models.build_model(config.model, len(class_names), config.image_size, config.weights,
                                   config.dropout, config.chexnet_weights)
        _compile(model, config, prepared, optimizers.build_optimizer(config, prepared.learning_rate))
        # Every weight gets its optimizer state now: a frozen backbone joins the training later.
        model.optimizer.build(model.trainable_variables)
        setup.prepare_model(model)
    return model


def _compile(model: keras.Model, config: TrainConfig, prepared: _Prepared,
             optimizer: keras.optimizers.Optimizer) -> None:
    """Compile ``model`` for training: again after its trainable weights change, with the same optimizer."""
    train_counts = list(prepared.data.index.class_counts("train").values())
    model.compile(
        optimizer=optimizer,
        loss=losses.build_loss(config.loss, train_counts, config.focal_gamma, config.focal_alpha,
                               config.label_smoothing),
        metrics=metrics.epoch_metrics(prepared.data.index.class_names),
        jit_compile=_jit_compile(config.jit_compile),
    )


@dataclasses.dataclass(frozen=True)
class _Trained:
    """What ``_fit`` leaves the chief for ``_finish``."""

    run_dir: str
    initial_epoch: int
    best_epoch: int
    best_value: float  # of config.select_by
    epochs_run: int
    model_config: dict  # the trained model, serialized: rebuilt on one device for the best epoch
    fit_seconds: float
    stopped_early_after: int | None  # the epoch after which --early_stopping_patience stopped training


def _fit(config: TrainConfig, prepared: _Prepared, model: keras.Model, setup: distribution.Setup,
         verbose: int | str, extra_callbacks: list[keras.callbacks.Callback]) -> _Trained | None:
    """Fit on every worker; the chief also writes the run directory. None on the other workers."""
    run_dir = prepared.resumed_dir
    if run_dir is None and setup.is_chief:
        run_dir = rundir.start_run(config, prepared.data.index, prepared.data.skipped)
        logger.info("Run directory: %s", run_dir)
    backup_dir = os.path.join(run_dir, rundir.BACKUP) if run_dir else None
    with setup.scope():
        initial_epoch = checkpoint.restore_backup(model, backup_dir) if backup_dir else 0
    if prepared.resumed_dir:
        logger.info("Resuming %s after epoch %d of %d", run_dir, initial_epoch, config.epochs)
    kept_rows = callbacks.HistoryCSV.resumed_rows(run_dir, initial_epoch) if run_dir else []
    best = callbacks.BestEpoch(config.select_by, kept_rows)
    early_stop = callbacks.EarlyStop(best, config.early_stopping_patience) if config.early_stopping_patience else None
    fit_callbacks = [
        keras.callbacks.LearningRateScheduler(
            lambda epoch: optimizers.learning_rate_at(epoch, config, prepared.learning_rate)),
        callbacks.StopOnNonFiniteLoss(),  # before the callbacks that keep an epoch
        *([keras.callbacks.SwapEMAWeights()] if config.ema_decay else []),  # validation sees the averages
        best,
    ]
    if setup.is_chief:  # the others write nothing
        fit_callbacks.append(callbacks.HistoryCSV(run_dir, prepared.datasets.images_per_epoch, kept_rows))
        if config.tensorboard:  # the first batch it shows is the first one this run trains on
            fit_callbacks.append(tensorboard_logs.TensorBoardLogs(
                run_dir, prepared.datasets.epochs(initial_epoch, initial_epoch + 1), prepared.data.index.class_names))
        fit_callbacks += [callbacks.EpochBackup(backup_dir, best),  # after the logs: a backup means a history row
                          callbacks.RunEstimate(config.epochs)]
    fit_callbacks += [early_stop] if early_stop else []  # last: the epoch is kept before training stops
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    start, epochs_run = time.perf_counter(), initial_epoch
    for first, stop, frozen in _phases(initial_epoch, config):
        if _set_backbone_trainable(model, not frozen):  # Keras compiles the trainable weights into its step
            with setup.scope():
                _compile(model, config, prepared, model.optimizer)
        history = fit_epochs(model, prepared.datasets, first, stop, setup,
                             validation_data=setup.evaluation_data(prepared.datasets, "val"),
                             class_weight=_class_weight(config, prepared.data.index),
                             callbacks=fit_callbacks + extra_callbacks, verbose=verbose if setup.is_chief else 0)
        epochs_run = history.epoch[-1] + 1 if history and history.epoch else epochs_run
        if model.stop_training:
            break
    fit_seconds = time.perf_counter() - start
    if model.stop_training and not (early_stop and early_stop.stopped_after):
        raise FloatingPointError(
            f"Training stopped in epoch {epochs_run}: the loss became NaN or infinite. Lower --learning_rate "
            f"(it is {prepared.learning_rate:g}) or check the data."
            + (f" {run_dir} is left unfinished; its {rundir.HISTORY} shows the epochs before." if run_dir else ""))
    if early_stop and early_stop.stopped_after:
        logger.info("--early_stopping_patience=%d: stopped after epoch %d, %d epochs after the best %s (epoch %d).",
                    early_stop.patience, early_stop.stopped_after, early_stop.patience, config.select_by,
                    best.best_epoch)
    if not setup.is_chief:
        return None
    if best.best_epoch is None:
        raise FloatingPointError(f"No epoch had a finite {config.select_by}, so there is no model to keep. Lower "
                                 f"--learning_rate (it is {prepared.learning_rate:g}) or check the data.")
    _set_backbone_trainable(model, True)  # the kept model is rebuilt whole, as it trains after any freeze
    with models.portable_batch_norm(model):  # rebuilt on one device
        model_config = keras.saving.serialize_keras_object(model)
    return _Trained(run_dir, initial_epoch, best.best_epoch, best.value, epochs_run, model_config, fit_seconds,
                    early_stop.stopped_after if early_stop else None)


def _phases(initial_epoch: int, config: TrainConfig) -> list[tuple[int, int, bool]]:
    """``(first, stop, backbone frozen)`` epoch ranges still to train: the frozen ones, then the rest."""
    freeze = min(config.freeze_backbone_epochs, config.epochs)
    phases = [(initial_epoch, freeze, True), (max(initial_epoch, freeze), config.epochs, False)]
    return [phase for phase in phases if phase[0] < phase[1]]


def _set_backbone_trainable(model: keras.Model, trainable: bool) -> bool:
    """Freeze or unfreeze the backbone (its BatchNorm layers then use their moving statistics); whether it changed."""
    backbone = models.backbone_of(model)
    changed = backbone.trainable != trainable
    backbone.trainable = trainable
    return changed


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
    run_dir, index, formats = trained.run_dir, prepared.data.index, export_formats(config.export)
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
        calibration.write_calibration(run_dir, {**fitted, "fitted_on": "val", "saved_model": "saved_model" in formats})
        temperature = fitted["temperature"]
        logger.info("--calibrate: temperature %.3f lowers the val NLL from %.4f to %.4f", temperature,
                    fitted["nll"]["before"], fitted["nll"]["after"])
    export.export_model(best, run_dir, formats, temperature)
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
        "data_dirs": [os.path.abspath(path) for path in prepared.data.data_dirs],
        "data_csv": None if config.data_csv is None else os.path.abspath(config.data_csv),
        "sources": {name: {**source, "images": images} for (name, source), images in
                    zip(index.sources.items(), index.source_counts().values())},
        "absent_classes": list(index.absent_classes),
        "task": config.task,
        "classes": list(index.class_names),
        "images": {split: index.class_counts(split) for split in data.SPLITS},
        "patients": {split: index.patient_count(split) for split in data.SPLITS},
        "split_by": config.split_by,
        "excluded_rows": index.excluded,
        "model_selection": {"monitor": config.select_by, "best_epoch": trained.best_epoch,
                            "best_value": trained.best_value, "epochs_run": trained.epochs_run,
                            "stopped_early_after": trained.stopped_early_after,
                            "weight_averages": bool(config.ema_decay)},
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
    logger.info("Best epoch %d of %d (by %s): %s", trained.best_epoch, trained.epochs_run, config.select_by, summary)
    if prepared.data.synthetic:
        logger.warning(preflight.SYNTHETIC_WARNING.format(path=prepared.data.data_dirs[0]))
    return run_dir


def _class_weight(config: TrainConfig, index: data.DataIndex) -> dict[int, float] | None:
    if config.class_weight == "none":
        return None
    return dict(enumerate(losses.balanced_weights(list(index.class_counts("train").values()))))


def _jit_compile(value: str) -> str | bool:
    return {"auto": "auto", "true": True, "false": False}[value]
