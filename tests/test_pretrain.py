"""``xray-pretrain`` (``python -m xray_tf.pretrain``) as a user runs it: errors in one line, a run on the JAX
backend, and its backbone as the trainer's linear probe (``--freeze_backbone_epochs`` = ``--epochs``)."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT

from xray_tf import models, rundir, synthetic, training
from xray_tf.config import TrainConfig


def _pretrain(*args: str, backend: str = "tensorflow") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xray_tf.pretrain", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "KERAS_BACKEND": backend})


def test_a_bad_setting_is_one_line_naming_the_flag(tmp_path):
    result = _pretrain(f"--images={tmp_path / 'absent'}", f"--output_dir={tmp_path}")
    assert result.returncode == 1
    assert f"xray-pretrain: error: --images={tmp_path / 'absent'}: no such folder or file." in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_pretraining_on_jax_gives_a_backbone_the_trainer_probes_frozen(tmp_path):
    data = synthetic.write_dataset(str(tmp_path / "data"), num_train=40, num_test=8, layout="folders", min_size=40,
                                   max_size=64)
    result = _pretrain(f"--images={data}", "--model=mobilenetv3small", "--method=simsiam", "--image_size=32",
                       "--batch_size=8", "--embedding_dim=32", "--epochs=2", f"--output_dir={tmp_path / 'runs'}",
                       "--run_name=jax", backend="jax")
    run_dir = str(tmp_path / "runs" / "jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Run directory: {run_dir}" in result.stdout
    assert "Epoch 2/2" in result.stdout and "embedding_std" in result.stdout  # progress per epoch
    assert len(pd.read_csv(os.path.join(run_dir, rundir.HISTORY))) == 2
    # The linear probe: the whole run with the backbone frozen leaves its weights (BatchNorm statistics too) as
    # pretrained; only the head learns.
    weights = os.path.join(run_dir, rundir.BACKBONE_WEIGHTS)
    probe = training.run(TrainConfig(data_dir=(data,), model="mobilenetv3small", weights=weights, image_size=32,
                                     batch_size=8, epochs=1, freeze_backbone_epochs=1, output_dir=str(tmp_path),
                                     run_name="probe", export="saved_model"), verbose=0)
    kept = models.load_model(os.path.join(probe, rundir.MODEL))
    pretrained = models.build_model("mobilenetv3small", 2, 32, weights=weights)

    def backbone(model: keras.Model) -> list[np.ndarray]:
        return next(layer for layer in model.layers if isinstance(layer, keras.Model)).get_weights()

    for mine, theirs in zip(backbone(kept), backbone(pretrained)):
        np.testing.assert_array_equal(mine, theirs)
