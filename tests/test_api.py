"""The Python API (``xray_tf.train``, ``xray_tf.api``): one tiny run returns what its directory holds,
a user's callbacks see its epochs, a bad setting is named as a field, and ``import xray_tf`` stays light.

Every test reads conftest's ``lever_run`` (shared with test_levers: a run through ``xray_tf.train``
with a user's callback); test_run_writes_tensorboard_logs checks its TensorBoard logs with
test_tensorboard_logs' readers.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_tensorboard_logs import decoded_images, read_events, scalars

import xray_tf
from xray_tf import api, rundir, tensorboard_logs
from xray_tf.config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def result(lever_run) -> api.TrainResult:
    return lever_run["result"]


def test_train_returns_the_finished_run(result):
    assert isinstance(result, api.TrainResult)
    assert rundir.is_finished(result.run_dir)
    assert list(result.history["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(result.history, rundir.read_history(result.run_dir))
    assert result.metrics == rundir.read_metrics(result.run_dir)
    assert result.metrics["model_selection"]["epochs_run"] == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.run_dir = "elsewhere"


def test_the_model_is_the_kept_one_and_predicts(result):
    classes = rundir.read_classes(result.run_dir)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    probabilities = result.model.predict(images, verbose=0)
    assert probabilities.shape == (3, len(classes))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert not result.model.compiled  # model.keras is for inference: no optimizer state


def test_user_callbacks_see_every_epoch(result, lever_run):
    recorder = lever_run["recorder"]
    assert recorder.epochs == [0, 1, 2]  # across the frozen backbone's fit and the rest
    np.testing.assert_allclose([logs["val_loss"] for logs in recorder.logs], result.history["val_loss"], rtol=1e-5)


def test_run_writes_tensorboard_logs(result):
    log_dir = tensorboard_logs.log_dir(result.run_dir)
    train = read_events(os.path.join(log_dir, tensorboard_logs.TRAIN))
    validation = read_events(os.path.join(log_dir, tensorboard_logs.VALIDATION))
    history = result.history.set_index("epoch")
    assert scalars(train, "epoch_loss") == pytest.approx(history["loss"].to_dict(), rel=1e-5)
    assert scalars(validation, "epoch_loss") == pytest.approx(history["val_loss"].to_dict(), rel=1e-5)
    assert scalars(train, "epoch_learning_rate") == pytest.approx(history["learning_rate"].to_dict(), rel=1e-6)
    (step, images), = decoded_images(train).items()
    assert step == 1 and images.shape == (8, 32, 32, 1)


def test_a_bad_setting_raises_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError) as caught:
        xray_tf.train(TrainConfig(batch_size=0, output_dir=str(tmp_path)))
    assert caught.value.field == "batch_size"
    assert str(caught.value).startswith("batch_size=0:") and "--" not in str(caught.value)
    assert not os.listdir(tmp_path)  # refused before any run directory


def test_package_exports_the_api():
    assert xray_tf.train is api.train and xray_tf.TrainResult is api.TrainResult
    assert xray_tf.TrainConfig is TrainConfig
    assert {"train", "TrainConfig", "TrainResult"} <= set(dir(xray_tf))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        xray_tf.nothing


LIGHT_IMPORTS = """
import sys
import xray_tf
from xray_tf.config import TrainConfig
assert xray_tf.TrainConfig is TrainConfig
heavy = sorted({"keras", "tensorflow", "jax"} & set(sys.modules))
assert not heavy, heavy
"""


def test_importing_the_package_and_its_config_loads_no_keras():
    result = subprocess.run([sys.executable, "-c", LIGHT_IMPORTS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
