"""TensorBoard logs (``xray_tf.tensorboard_logs``): the event files of a tiny model's fit hold every
epoch's metrics, the learning rate and the logged training images, on both backends; a resumed fit
continues them; a missing tensorboard package is reported with the install command.

The logs of a whole run are checked in test_api, on the run the API tests share.
"""

from __future__ import annotations

import glob
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_under_jax

from xray_tf import rundir, tensorboard_logs

SIZE, CLASSES = 32, ("Normal", "Bacteria", "Virus")


def summaries(folder: str) -> list[tuple[int, object]]:
    """``(step, summary value)`` of every event file in ``folder``, files in the order written."""
    paths = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
    return [(event.step, value) for path in paths for record in tf.data.TFRecordDataset(path)
            for event in [tf.compat.v1.Event.FromString(record.numpy())] for value in event.summary.value]


def read_events(folder: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``tag -> [(step, value)]`` of the summaries in ``folder``."""
    events: dict[str, list[tuple[int, np.ndarray]]] = {}
    for step, value in summaries(folder):
        events.setdefault(value.tag, []).append((step, tf.make_ndarray(value.tensor)))
    return events


def scalars(events: dict, tag: str) -> dict[int, float]:
    return {step: float(value) for step, value in events[tag]}


def decoded_images(events: dict, tag: str = tensorboard_logs.IMAGES_TAG) -> dict[int, np.ndarray]:
    """``step -> uint8 [k, H, W, C]``: an image summary's tensor is width, height, then one PNG an image."""
    return {step: np.stack([tf.io.decode_png(png).numpy() for png in value[2:]]) for step, value in events[tag]}


def sample_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.eye(len(CLASSES), dtype=np.float32)[rng.integers(0, len(CLASSES), count)]
    return rng.integers(0, 256, (count, SIZE, SIZE, 1), dtype=np.uint8), labels


def tiny_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def fit(model: keras.Model, run_dir: str, first: int, stop: int,
        logged: tf.data.Dataset) -> keras.callbacks.History:
    """Epochs ``first`` to ``stop - 1`` with a halving learning rate, validation and the logs."""
    images, labels = sample_images(16)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 * 0.5 ** epoch)
    logs = tensorboard_logs.TensorBoardLogs(run_dir, logged, CLASSES, count=8)
    return model.fit(images, labels, batch_size=8, initial_epoch=first, epochs=stop, verbose=0,
                     validation_data=(images[:8], labels[:8]), callbacks=[schedule, logs])


def test_logs_hold_each_epochs_metrics_learning_rate_and_the_first_images(tmp_path):
    images, labels = sample_images(12, seed=1)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)  # 8 images span two batches
    history = fit(tiny_model(), str(tmp_path), 0, 2, batches).history
    log_dir = os.path.join(tmp_path, rundir.TENSORBOARD)
    assert log_dir == tensorboard_logs.log_dir(str(tmp_path))
    train_dir = os.path.join(log_dir, tensorboard_logs.TRAIN)
    train = read_events(train_dir)
    validation = read_events(os.path.join(log_dir, tensorboard_logs.VALIDATION))

    for metric in ("loss", "accuracy"):
        np.testing.assert_allclose(list(scalars(train, f"epoch_{metric}").values()), history[metric], rtol=1e-6)
        np.testing.assert_allclose(list(scalars(validation, f"epoch_{metric}").values()), history[f"val_{metric}"],
                                   rtol=1e-6)
        assert list(scalars(train, f"epoch_{metric}")) == [1, 2]  # epochs numbered as history.csv numbers them
    assert scalars(train, "epoch_learning_rate") == pytest.approx({1: 0.1, 2: 0.05})
    assert "epoch_learning_rate" not in validation and not any(tag.startswith("epoch_val_") for tag in validation)

    logged = decoded_images(train)
    assert list(logged) == [1]  # once, at the start
    np.testing.assert_array_equal(logged[1], images[:8])  # PNG is lossless
    description = next(value.metadata.summary_description for _, value in summaries(train_dir)
                       if value.tag == tensorboard_logs.IMAGES_TAG)  # the metadata: in a tag's first event
    assert ", ".join(CLASSES[i] for i in labels[:8].argmax(axis=1)) in description


def test_a_resumed_fit_continues_the_logs(tmp_path):
    model = tiny_model()
    images, labels = sample_images(8, seed=2)
    fit(model, str(tmp_path), 0, 2, [sample_images(8, seed=3)])
    fit(model, str(tmp_path), 2, 3, [(images, labels)])  # resumed after epoch 2
    train = read_events(os.path.join(tensorboard_logs.log_dir(str(tmp_path)), tensorboard_logs.TRAIN))
    assert list(scalars(train, "epoch_loss")) == [1, 2, 3]
    assert scalars(train, "epoch_learning_rate")[3] == pytest.approx(0.025)
    logged = decoded_images(train)
    assert list(logged) == [1, 3]  # each fit logs the batches of its first epoch
    np.testing.assert_array_equal(logged[3], images)


def test_images_that_are_not_uint8_are_refused(tmp_path):
    images, labels = sample_images(2)
    logs = tensorboard_logs.TensorBoardLogs(str(tmp_path), [(images / 255.0, labels)])
    with pytest.raises(ValueError, match=r"batches: images must be uint8 .*float64"):
        logs.on_epoch_begin(0)


def test_missing_package_is_reported_with_the_install_command(monkeypatch):
    assert tensorboard_logs.missing_package() is None  # the test extra installs tensorboard
    monkeypatch.setitem(sys.modules, "tensorboard.summary.v2", None)  # the import now fails
    problem = tensorboard_logs.missing_package()
    assert problem is not None and "\n" not in problem
    assert "tensorboard package" in problem and "pip install 'xray_tf[tensorboard]'" in problem


JAX_CHECK = """
import keras, pathlib, sys, test_tensorboard_logs
assert keras.config.backend() == "jax", keras.config.backend()
test_tensorboard_logs.test_logs_hold_each_epochs_metrics_learning_rate_and_the_first_images(pathlib.Path(sys.argv[1]))
"""


def test_jax_backend_writes_the_same_logs(tmp_path):
    result = run_under_jax(JAX_CHECK, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
