"""Shared fixtures: tiny synthetic datasets and the optional real data beside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from xray_tf import data, pipeline, synthetic
from xray_tf.config import TrainConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


# Test files that use a costly session fixture run on one xdist worker, which builds it once;
# every other file is a group of its own, as under --dist loadfile.
_WORKER_GROUPS = {"test_scripts": "paper_results", "test_evaluate": "paper_results",
                  "test_api": "lever_run", "test_levers": "lever_run"}


# The groups of whole training runs, longest first: xdist hands out groups in collection order, so
# starting these first keeps one of them from starting last and leaving the other worker idle.
_LONGEST_FIRST = ("test_distribution", "test_train_cli", "test_training", "paper_results", "test_packaging")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (--dist loadgroup, setup.cfg)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    groups = {item: _WORKER_GROUPS.get(item.path.stem, item.path.stem) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    rank = {group: position for position, group in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))  # stable: files keep their own order


def pytest_configure(config: pytest.Config) -> None:
    # Keras' TensorFlow backend converts tensors with np.array(x), which NumPy 2 reports on every
    # call (thousands per run) because TensorFlow's __array__ takes no copy argument: neither is
    # this project's code, and the flood would hide the warnings that are.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword"
                            ":DeprecationWarning:keras.src.backend.tensorflow.core")


def shared_data(name: str) -> str:
    """Path of ``../shared/data/<name>``, or skip the test when this machine does not have it."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"real data {path} is absent (only on the project's development machines)")
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """xray_tf's cache (the synthetic dataset, compiled programs) goes to a temporary folder, not
    the user's home; training subprocesses inherit it through the environment."""
    previous = os.environ.get("XRAY_TF_CACHE")
    os.environ["XRAY_TF_CACHE"] = str(tmp_path_factory.mktemp("xray_tf_cache"))
    yield os.environ["XRAY_TF_CACHE"]
    if previous is None:
        del os.environ["XRAY_TF_CACHE"]
    else:
        os.environ["XRAY_TF_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A small synthetic CoronaHack-layout dataset (all four classes, TRAIN and TEST)."""
    out = tmp_path_factory.mktemp("data") / "coronahack"
    return synthetic.write_dataset(str(out), num_train=80, num_test=24, seed=1, min_size=40, max_size=72)


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory) -> str:
    """A tinier CoronaHack-layout dataset: 30 TRAIN images (12 Bacteria) and 24 TEST images.

    For the many short runs of test_training and test_checkpoint; tests that damage it copy it first.
    """
    out = tmp_path_factory.mktemp("clean") / "coronahack"
    return synthetic.write_dataset(str(out), num_train=24, num_test=8, seed=7, min_size=40, max_size=64)


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` from the repo root and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_under_jax(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args...`` on the JAX backend, in tests/ so that ``code`` can import test modules."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=os.path.join(REPO_ROOT, "tests"),
                          env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": REPO_ROOT},
                          capture_output=True, text=True, timeout=300)


# Tiny settings for the paper's experiments: the cheapest backbone from random weights, 32 px, 2 epochs.
PAPER_TINY_FLAGS = ("--model=mobilenetv3small", "--weights=none", "--image_size=32", "--batch_size=16", "--epochs=2",
                    "--lr_decay_epochs=1")


@pytest.fixture(scope="session")
def paper_results(tmp_path_factory, tiny_dataset) -> str:
    """``scripts/run_paper.py`` over one tiny experiment named ``prce`` and one seed, evaluated on val and test.

    Returns the results directory: ``prce_seed0/`` (with metrics_val.json, metrics_test.json and their
    PNGs), ``table.md``/``.csv``/``_runs.csv`` and ``figures/``. One training shared by the tests of
    evaluate, the table and the figures.
    """
    root = tmp_path_factory.mktemp("paper")
    flags_dir = root / "flags"
    flags_dir.mkdir()
    (flags_dir / "prce.cfg").write_text("--model=resnet50\n--loss=ce\n--run_name=ignored\n")
    results = root / "results"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "run_paper.py"), f"--results_dir={results}",
         f"--flags_dir={flags_dir}", "--experiments=prce", "--seeds=0", f"--data_dir={tiny_dataset}",
         "--evaluate_splits=val,test", "--", *PAPER_TINY_FLAGS],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(results)


def small_settings(**overrides) -> pipeline.PipelineSettings:
    """Pipeline settings small enough for a test: 32 px, batches of 8."""
    return pipeline.PipelineSettings(**{"image_size": 32, "batch_size": 8, **overrides})


def epoch(datasets: pipeline.Datasets, number: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Epoch ``number``'s training batches as NumPy arrays."""
    return [(images.numpy(), labels.numpy()) for images, labels in datasets.epochs(number, number + 1)]


@pytest.fixture(scope="module")
def index(tiny_dataset) -> data.DataIndex:
    """The tiny dataset's index with a 20 % validation split."""
    return data.load_index(tiny_dataset, val_fraction=0.2)



class RunRecorder(keras.callbacks.Callback):
    """A user's callback: each epoch's logs, the backbone's weights (BatchNorm statistics too) before
    training and after each epoch, and all weights after each epoch and as validation used them."""

    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []
        self.logs: list[dict] = []
        self.backbone: list[list[np.ndarray]] = []
        self.validated: list[list[np.ndarray]] = []
        self.trained: list[list[np.ndarray]] = []

    def _weights(self, model: keras.Model) -> list[np.ndarray]:
        return [ops.convert_to_numpy(weight) for weight in model.weights]  # frozen or not

    def on_train_begin(self, logs=None):
        if not self.backbone:  # the first of the fits (a frozen backbone's, then the rest)
            self.backbone.append(self._weights(next(layer for layer in self.model.layers
                                                    if isinstance(layer, keras.Model))))

    def on_test_begin(self, logs=None):  # after the run's own callbacks: SwapEMAWeights has swapped
        self.validated.append(self._weights(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.logs.append(dict(logs or {}))
        self.backbone.append(self._weights(next(layer for layer in self.model.layers
                                                if isinstance(layer, keras.Model))))
        self.trained.append(self._weights(self.model))


# Levers of issue 22 for lever_run: each changes what the run does in a way its tests can see.
LEVERS = dict(optimizer="sgd", momentum=0.9, learning_rate=0.01, schedule="cosine", warmup_epochs=1,
              label_smoothing=0.1, ema_decay=0.5, freeze_backbone_epochs=1, backbone_lr_multiplier=0.5,
              select_by="val_macro_f1", augment="strong", mixup_alpha=0.4)


@pytest.fixture(scope="session")
def lever_run(clean_dataset, tmp_path_factory) -> dict:
    """One short run through the Python API (``xray_tf.train``) with ``LEVERS`` on, TensorBoard logs, and
    a ``RunRecorder``: shared by test_api and test_levers. Returns ``result``, ``recorder``, ``config``."""
    import xray_tf  # the API under test

    config = TrainConfig(data_dir=clean_dataset, model="mobilenetv3small", weights="none", image_size=32,
                         batch_size=8, val_fraction=0.3, epochs=3, tensorboard=True,
                         output_dir=str(tmp_path_factory.mktemp("lever_run")), **LEVERS)
    recorder = RunRecorder()
    return {"result": xray_tf.train(config, callbacks=[recorder], verbose=0), "recorder": recorder, "config": config}
