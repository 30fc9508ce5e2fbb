"""benchmarks/: every script starts and shows its flags; the timing callbacks; the PyTorch side's fairness."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each benchmark module and one flag of its own that --help must list.
MODULES = {"pipeline": "--decode_files", "train_step": "--keras_loop", "end_to_end": "--torch_reference",
           "end_to_end_torch": "--report", "fit_overhead": "--profile_dir", "scale": "--work_dir"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_help(name):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO_ROOT, check=False,
                            capture_output=True, text=True, timeout=120)
    # The benchmarks start like the commands (xray_tf.cli.start): --help exits 0.
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert MODULES[name] in result.stdout and "Try --helpfull" in result.stdout, result.stdout


@pytest.fixture
def timing(monkeypatch):
    """``benchmarks.timing``, importable from the repository root, where the benchmarks run."""
    monkeypatch.syspath_prepend(REPO_ROOT)
    return importlib.import_module("benchmarks.timing")


def tiny_model():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_fit_clock_and_epoch_clock(timing):
    rng = np.random.default_rng(0)
    images, targets = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    fit_clock, epoch_clock = timing.FitClock(), timing.EpochClock()
    with pytest.raises(RuntimeError):
        fit_clock.split(0.0, 1.0)
    start = time.perf_counter()
    tiny_model().fit(images, targets, batch_size=4, epochs=2, verbose=0, callbacks=[fit_clock, epoch_clock])
    end = time.perf_counter()

    assert start <= fit_clock.first_epoch_begin <= fit_clock.last_epoch_end <= end
    assert len(epoch_clock.seconds) == 2 and all(seconds > 0 for seconds in epoch_clock.seconds)
    parts = fit_clock.split(start, end)
    assert all(seconds >= 0 for seconds in parts.values())
    assert sum(parts.values()) == pytest.approx(end - start)


def test_timed_fit(timing):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    feed = tf.data.Dataset.from_tensor_slices((rng.normal(size=(8, 3)).astype("float32"),
                                               rng.normal(size=(8, 2)).astype("float32"))).batch(4).repeat()
    seconds = timing.timed_fit(tiny_model(), feed, steps=2, epochs=2)
    assert len(seconds) == 2 and all(value > 0 for value in seconds)


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_torch_twins_train_as_many_parameters_as_the_keras_models(name, monkeypatch):
    # The train-step and end-to-end comparisons are fair only if both sides train the same network.
    pytest.importorskip("torch", reason="the PyTorch side of the benchmarks")
    monkeypatch.syspath_prepend(REPO_ROOT)
    torch_models = importlib.import_module("benchmarks.torch_models")
    from xray_tf import models

    keras_model = models.build_model(name, 4, 32, weights="none")
    keras_count = sum(int(np.prod(variable.shape)) for variable in keras_model.trainable_weights)
    twin = torch_models.keras_twin(name)
    assert sum(parameter.numel() for parameter in twin.parameters()) == keras_count


@pytest.mark.slow
def test_torch_recipe_trains_and_reports_its_stages(clean_dataset, tmp_path):
    # end_to_end.py --torch_reference reads this report; a broken reference would surface only on a GPU.
    pytest.importorskip("torch", reason="the PyTorch side of the benchmarks")
    report = tmp_path / "torch.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.end_to_end_torch", "--model=densenet121", f"--data_dir={clean_dataset}",
         f"--output_dir={tmp_path}", f"--report={report}", "--workers=1", "--",
         "--image_size=32", "--epochs=2", "--batch_size=8", "--val_fraction=0.25"],
        cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(report.read_text())
    assert set(written["seconds"]) == {"decode_and_cache", "fit", "finish"}
    assert len(written["epoch_seconds"]) == len(written["val_loss"]) == 2
    assert 0 <= written["val_balanced_accuracy"] <= 1
    assert (tmp_path / "torch_densenet121.pt").is_file()
