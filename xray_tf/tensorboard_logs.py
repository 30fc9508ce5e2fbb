"""TensorBoard logs of a run (``--tensorboard``): every epoch's metrics and learning rate, and a few
augmented training images, under ``RUN/tensorboard/train`` and ``RUN/tensorboard/validation``.

The event files are written with ``tf.summary``, which is I/O and works on either Keras backend;
but TensorFlow only declares ``tf.summary.scalar`` and ``tf.summary.image``, their implementation
is the tensorboard package's. Without it they raise (after an empty event file has been created),
so ``missing_package`` is asked before a run starts. The package is needed to view the logs too.

Steps are epoch numbers as ``history.csv`` counts them (from 1). Each epoch's events are flushed
when it ends, so a killed run keeps the epochs it finished, and a resumed run's writers add event
files beside the earlier ones, which TensorBoard reads as one run continued. (Keras' own
TensorBoard callback tags its scalars the same way, but flushes every ten events or two minutes,
so a killed run could lose its last epochs, and adds a per-iteration copy of every validation metric.)
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from xray_tf import rundir

TRAIN, VALIDATION = "train", "validation"  # Keras' TensorBoard callback names its two writers' folders so
IMAGES_TAG = "augmented_training_images"


def missing_package() -> str | None:
    """None when TensorBoard logs can be written (and viewed); else the problem, in one line."""
    try:
        importlib.import_module("tensorboard.summary.v2")  # where tf.summary.scalar and .image are implemented
    except ImportError as error:
        return (f"TensorBoard logs need the tensorboard package, which cannot be imported ({error}): "
                "pip install 'xray_tf[tensorboard]'")
    return None


def log_dir(run_dir: str) -> str:
    """The folder of a run's TensorBoard logs: the ``--logdir`` to view it with."""
    return os.path.join(run_dir, rundir.TENSORBOARD)


class TensorBoardLogs(keras.callbacks.Callback):
    """Writes a run's TensorBoard logs while ``fit`` trains.

    At the end of each epoch: every training metric of Keras' logs and the optimizer's learning
    rate under ``train/``, the ``val_`` metrics under ``validation/`` (without the prefix), as
    scalars tagged ``epoch_<metric>`` as Keras' own TensorBoard callback tags them. At the start of
    the first epoch, once: the first ``count`` images of ``batches`` as one image summary.
    """

    def __init__(self, run_dir: str, batches: Iterable[tuple[object, object]],
                 class_names: Sequence[str] | None = None, count: int = 8):
        """``batches``: ``(uint8 images [B, S, S, 1], one-hot labels [B, classes])`` pairs, such as the
        training pipeline's ``tf.data.Dataset`` of the first epoch run; read only as far as ``count``
        images, at the start of that epoch. ``class_names``: to name each image's class in the summary.
        """
        super().__init__()
        if count < 1:
            raise ValueError(f"count={count}: at least one image is logged.")
        self.log_dir = log_dir(run_dir)
        self.batches = batches
        self.class_names = list(class_names) if class_names is not None else None
        self.count = count
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        self._images_written = False

    def _writer(self, name: str) -> tf.summary.SummaryWriter:
        # Created on first use, so that a fit that never reaches an epoch leaves no empty event file.
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
        return self._writers[name]

    def on_epoch_begin(self, epoch, logs=None):
        if not self._images_written:
            self._write_images(epoch + 1)
            self._images_written = True

    def on_epoch_end(self, epoch, logs=None):
        logs = {name: float(value) for name, value in (logs or {}).items() if name != "learning_rate"}
        train = {name: value for name, value in logs.items() if not name.startswith("val_")}
        # The optimizer's rate rather than the logs': only a LearningRateScheduler puts it there.
        train["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        validation = {name.removeprefix("val_"): value for name, value in logs.items() if name.startswith("val_")}
        for writer_name, scalars in ((TRAIN, train), (VALIDATION, validation)):
            if scalars:
                writer = self._writer(writer_name)
                with writer.as_default():
                    for name, value in scalars.items():
                        tf.summary.scalar(f"epoch_{name}", value, step=epoch + 1)
                writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _write_images(self, step: int) -> None:
        images, labels = self._first_images()
        description = f"The first {len(images)} augmented training images of epoch {step}"
        if self.class_names is not None:
            classes = ", ".join(self.class_names[i] for i in np.argmax(labels, axis=-1))  # MixUp: the larger share
            description += f"; their classes, in order: {classes}"
        writer = self._writer(TRAIN)
        with writer.as_default():
            tf.summary.image(IMAGES_TAG, images, step=step, max_outputs=len(images), description=description + ".")
        writer.flush()

    def _first_images(self) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` images and their labels from the first batches of ``batches``."""
        images, labels, taken = [], [], 0
        for batch_images, batch_labels in self.batches:
            batch_images, batch_labels = np.asarray(batch_images), np.asarray(batch_labels)
            if batch_images.dtype != np.uint8 or batch_images.ndim != 4:
                raise ValueError(f"batches: images must be uint8 [batch, height, width, channels], got "
                                 f"{batch_images.dtype} {list(batch_images.shape)}.")
            images.append(batch_images[: self.count - taken])
            labels.append(batch_labels[: self.count - taken])
            taken += len(images[-1])
            if taken == self.count:
                break
        if not taken:
            raise ValueError("batches: no images to log.")
        return np.concatenate(images), np.concatenate(labels)
