"""Self-supervised pretraining of a classifier's backbone on unlabeled X-rays (``python -m xray_tf.pretrain``,
whose command line is ``xray_tf.cli.pretrain``; this module is the library, as ``training`` is ``train``'s).

The model is the classifier's trunk (``models.XrayPreprocessing`` on uint8 images, the backbone of
``models.build_backbone``, global average pooling), a projector MLP and, for SimSiam, a predictor;
each of a batch's two views (``ssl_views``) goes through it on its own, so BatchNorm sees one
view at a time as in both papers. Training is Keras' own ``fit``: only ``compute_loss`` (the
method's loss, ``ssl_losses``) and ``compute_metrics`` (the collapse indicator) are overridden,
which the TensorFlow and JAX trainers both call, so the same code runs on either backend.

The run directory follows training's: ``flags.txt``, ``history.csv`` (loss, embedding_std and the
learning rate per epoch), the atomic per-epoch backup that ``resume`` continues from (the views of
epoch e derive from the seed and e, so a resumed run ends with the uninterrupted run's weights),
``images.csv``, then ``backbone.weights.h5`` (the backbone alone, which ``xray-train
--model=SAME --weights=PATH`` loads) and ``backbone.json`` (which backbone; written last).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import keras
import pandas as pd
from keras import ops

from xray_tf import callbacks, checkpoint, models, preflight, pretrain_data, rundir, ssl_losses, ssl_views
from xray_tf.backbones import BACKBONES
from xray_tf.config import ConfigError
from xray_tf.pretrain_config import PretrainConfig

logger = logging.getLogger(__name__)


def build_encoder(model_name: str, image_size: int, weights: str = "none") -> keras.Model:
    """``uint8 [B, S, S, 1 or 3] -> features [B, F]``: the classifier's input layer, backbone and pooling."""
    backbone = models.build_backbone(model_name, image_size, weights)
    inputs = keras.Input((image_size, image_size, None), dtype="uint8", name="image")
    x = models.XrayPreprocessing(BACKBONES[model_name].normalization, name="preprocessing")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone(x))
    return keras.Model(inputs, x, name="encoder")


def _mlp(name: str, input_dim: int, widths: Sequence[int], normalise_output: bool) -> keras.Model:
    """Dense layers with BatchNorm and ReLU between them (and BatchNorm after the last one if asked)."""
    inputs = keras.Input((input_dim,), name=f"{name}_input")
    x = inputs
    for position, width in enumerate(widths):
        last = position == len(widths) - 1
        x = keras.layers.Dense(width, use_bias=last and not normalise_output, name=f"{name}_dense{position}")(x)
        if not last or normalise_output:
            x = keras.layers.BatchNormalization(name=f"{name}_bn{position}")(x)
        if not last:
            x = keras.layers.ReLU(name=f"{name}_relu{position}")(x)
    return keras.Model(inputs, x, name=name)


class SelfSupervised(keras.Model):
    """Two views in, their projections (and SimSiam's predictions) out; the loss is the method's."""

    def __init__(self, encoder: keras.Model, method: str, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        if method not in ssl_losses.METHODS:
            raise ConfigError("method", method, f"not one of {', '.join(ssl_losses.METHODS)}.")
        self.method = method
        self.encoder = encoder
        features = encoder.output.shape[-1]
        # SimSiam's projector ends in BatchNorm (its paper's design); VICReg's expander in a plain Dense.
        self.projector = _mlp("projector", features, [embedding_dim] * 3, normalise_output=method == "simsiam")
        self.predictor = (_mlp("predictor", embedding_dim, [max(embedding_dim // 4, 1), embedding_dim], False)
                          if method == "simsiam" else None)
        self.embedding_std = keras.metrics.Mean(name="embedding_std")

    def build(self, input_shape):
        """The parts are built functional models already; nothing is left for a first batch to build."""
        self.built = True

    def call(self, views, training=False):
        outputs = []
        for images in views:
            projection = self.projector(self.encoder(images, training=training), training=training)
            prediction = projection if self.predictor is None else self.predictor(projection, training=training)
            outputs.append((projection, prediction))
        return tuple(outputs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        (first_projection, first_prediction), (second_projection, second_prediction) = y_pred
        if self.method == "vicreg":
            loss = ssl_losses.vicreg(first_projection, second_projection)
        else:
            loss = ssl_losses.simsiam(first_prediction, second_prediction, first_projection, second_projection)
        return loss + sum(self.losses) if self.losses else loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        projections = ops.concatenate([y_pred[0][0], y_pred[1][0]], axis=0)
        self.embedding_std.update_state(ssl_losses.embedding_std(projections))
        return self.get_metrics_result()


def build_model(config: PretrainConfig) -> SelfSupervised:
    """The compiled model, every variable built (the optimizer's too), so that ``fit`` draws no batch to build it."""
    keras.utils.set_random_seed(config.seed)
    encoder = build_encoder(config.model, config.image_size, config.weights)
    model = SelfSupervised(encoder, config.method, config.embedding_dim, name=f"pretrain_{config.method}")
    model.build(None)
    optimizer = (keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
                 if config.weight_decay else keras.optimizers.Adam(config.learning_rate))
    model.compile(optimizer=optimizer, jit_compile="auto")
    model.optimizer.build(model.trainable_variables)
    return model


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What ``run`` leaves: the run directory and the finished model."""

    run_dir: str
    model: SelfSupervised
    history: pd.DataFrame


def _check_same_images(run_dir: str, paths: Sequence[str]) -> None:
    """Refuse to resume on other images than the run started with (files added to or removed from a folder)."""
    listed = pd.read_csv(os.path.join(run_dir, rundir.PRETRAIN_IMAGES))["path"].tolist()
    if listed != list(paths):
        added, gone = sorted(set(paths) - set(listed)), sorted(set(listed) - set(paths))
        raise rundir.RunError(f"--resume: {run_dir} started on {len(listed)} images ({rundir.PRETRAIN_IMAGES}); "
                              f"--images now give {len(paths)}: {len(added)} new (e.g. {(added or ['none'])[0]}), "
                              f"{len(gone)} gone (e.g. {(gone or ['none'])[0]}). A run continues only on its own "
                              "images; start a new run for these.")


def _start_run(config: PretrainConfig, paths: Sequence[str]) -> str:
    """A new run directory holding its settings (naming the directory created) and the list of its images."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = rundir.create(config.output_dir, config.run_name or f"pretrain_{config.model}_{config.method}_{stamp}")
    own = dataclasses.replace(config, run_name=os.path.basename(run_dir))
    rundir.write_text(os.path.join(run_dir, rundir.FLAGS), own.to_flagfile())
    rundir.write_text(os.path.join(run_dir, rundir.PRETRAIN_IMAGES), pd.DataFrame({"path": paths}).to_csv(index=False))
    return run_dir


def run(config: PretrainConfig, verbose: int | str = "auto",
        extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> Pretrained:
    """Pretrain as ``config`` says: a new run directory, or ``config.resume``'s after its last backed-up epoch.

    Everything that can fail on the user's input (the settings, the run to resume, every image)
    fails before the run directory is created or touched. ``extra_callbacks`` go to ``fit`` after the run's own.
    """
    config.validate()
    models.check_weights_available(config.model, config.weights)  # offline ImageNet weights: before decoding
    resumed_dir = rundir.run_to_resume(config, finished=rundir.BACKBONE_INFO) if config.resume else None
    images = pretrain_data.load_images(config.images, config.image_size, config.data_format, config.on_bad_image,
                                       config.cache, config.max_pixels)
    if resumed_dir:
        _check_same_images(resumed_dir, images.paths)
    if config.batch_size > len(images.paths):
        raise ConfigError("batch_size", config.batch_size, f"more than the {len(images.paths)} images to pretrain on.")
    logger.info("Pretraining %s with %s on %d images at %d px", config.model, config.method, len(images.paths),
                config.image_size)
    with models.global_dtype_policy(preflight.dtype_policy(config.mixed_precision)):
        model = build_model(config)
    run_dir = resumed_dir or _start_run(config, images.paths)
    backup_dir = os.path.join(run_dir, rundir.BACKUP)
    for path in rundir.remove_temporaries(run_dir) if resumed_dir else ():
        logger.info("--resume: removed %s, left by a write that was killed", path)
    initial_epoch = checkpoint.restore_backup(model, backup_dir)
    if resumed_dir:
        logger.info("Resuming %s after epoch %d of %d", run_dir, initial_epoch, config.epochs)
    else:
        logger.info("Run directory: %s", run_dir)
    settings = ssl_views.ViewSettings(image_size=config.image_size, batch_size=config.batch_size, seed=config.seed,
                                      crop_scale_min=config.crop_scale_min, rotation_degrees=config.rotation_degrees,
                                      blur_prob=config.blur_prob)
    steps = ssl_views.steps_per_epoch(len(images.paths), config.batch_size)
    kept_rows = callbacks.HistoryCSV.resumed_rows(run_dir, initial_epoch)
    fit_callbacks = [keras.callbacks.LearningRateScheduler(config.learning_rate_at), callbacks.StopOnNonFiniteLoss(),
                     callbacks.HistoryCSV(run_dir, steps * config.batch_size, kept_rows),
                     callbacks.EpochBackup(backup_dir), callbacks.RunEstimate(config.epochs), *extra_callbacks]
    if initial_epoch < config.epochs:
        views = ssl_views.epoch_views(images.images, settings, initial_epoch, config.epochs, images.rows)
        model.fit(views, steps_per_epoch=steps, initial_epoch=initial_epoch, epochs=config.epochs, shuffle=False,
                  callbacks=fit_callbacks, verbose=(1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose)
    history = pd.DataFrame(callbacks.HistoryCSV.resumed_rows(run_dir, config.epochs))
    if model.stop_training and not math.isfinite(history["loss"].iloc[-1]):
        raise FloatingPointError(f"Pretraining stopped: the loss became NaN or infinite. Lower --learning_rate (it "
                                 f"is {config.learning_rate:g}). {run_dir} is left unfinished.")
    if len(history) < config.epochs:
        return Pretrained(run_dir, model, history)  # stopped by a caller's callback: resumable
    _finish(config, run_dir, model, len(images.paths))
    return Pretrained(run_dir, model, history)


def _finish(config: PretrainConfig, run_dir: str, model: SelfSupervised, image_count: int) -> None:
    """The backbone's weights, then ``backbone.json`` naming it; the backups are no longer needed."""
    weights = os.path.join(run_dir, rundir.BACKBONE_WEIGHTS)
    rundir.write_atomic(weights, models.backbone_of(model.encoder).save_weights)
    rundir.write_json(os.path.join(run_dir, rundir.BACKBONE_INFO), {
        "model": config.model, "image_size": config.image_size, "method": config.method, "epochs": config.epochs,
        "images": image_count, "weights": rundir.BACKBONE_WEIGHTS,
        "fine_tune": f"xray-train --model={config.model} --weights={os.path.abspath(weights)}"})
    shutil.rmtree(os.path.join(run_dir, rundir.BACKUP), ignore_errors=True)
    logger.info("Pretrained backbone: %s (xray-train --model=%s --weights=%s)", weights, config.model, weights)
