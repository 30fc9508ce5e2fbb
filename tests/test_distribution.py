"""Data-parallel training: same batches, same trajectory, one run directory.

Devices are made on the CPU: two logical CPU devices for TensorFlow
(``tf.config.set_logical_device_configuration``), two host devices for JAX
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, used by the JAX run of test_train_cli).
Both must be set before the framework starts, so every test that trains does so in a fresh process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import REPO_ROOT

from xray_tf import config as config_lib
from xray_tf import data, distribution, pipeline

TINY_FLAGS = ("--model=mobilenetv3small", "--weights=none", "--image_size=32", "--batch_size=8", "--epochs=1",
              "--rotation_prob=0.3")

# Fits a small conv + BatchNorm model for 3 epochs through the project's pipeline and distribution
# code, with the distribution and BatchNorm synchronisation of argv[2]; prints the per-epoch losses.
# One variant per process: two multi-device strategies in one TensorFlow process clash in their
# collective ops. ResNet50 from scratch at 32 px is too chaotic for this comparison: an input change
# of 1e-6 changes its gradients by up to 2.4x.
_TRAJECTORIES = """
import contextlib, json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()
import keras
from xray_tf import data, distribution, models, pipeline, training

index = data.load_index(sys.argv[1], "four_class", 0.1, 0, None)
settings = pipeline.PipelineSettings(image_size=32, batch_size=8, seed=0)

def small_model():
    inputs = keras.Input((32, 32, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))

name, synchronized = sys.argv[2], sys.argv[3] == "synchronized"
with distribution.activate(name) as setup:
    datasets = pipeline.build_datasets(index.frame, 4, settings)
    pipeline.fill_caches(datasets)
    with setup.scope():
        keras.utils.set_random_seed(0)
        model = small_model()
        model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
        setup.prepare_model(model)  # synchronises BatchNorm over the replicas
    # portable_batch_norm turns the synchronisation off while the train step is traced.
    with contextlib.nullcontext() if synchronized else models.portable_batch_norm(model):
        history = training.fit_epochs(model, datasets, 0, 3, setup, verbose=0)
print("RESULTS", json.dumps({"replicas": setup.replicas, "loss": history.history["loss"]}))
"""

# A whole training run (TINY_FLAGS) on 2 mirrored logical CPU devices; prints the run directory.
_MIRRORED_RUN = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from xray_tf import training
from xray_tf.config import TrainConfig
print("RUN", training.run(TrainConfig.from_args(sys.argv[1:]), verbose=0))
"""


@pytest.fixture(scope="module")
def datasets(tiny_dataset) -> pipeline.Datasets:
    """Batches of 8 at 32 px over the tiny dataset, its images decoded."""
    index = data.load_index(tiny_dataset, val_fraction=0.2)
    datasets = pipeline.build_datasets(index.frame, 4, pipeline.PipelineSettings(image_size=32, batch_size=8))
    pipeline.fill_caches(datasets)
    return datasets


def _arrays(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(images.numpy(), labels.numpy()) for images, labels in dataset]


def test_worker_shares_and_replica_pieces_put_together_are_the_global_batches(datasets):
    whole = _arrays(datasets.epochs(0, 1))
    shares = [_arrays(distribution.share_of_batches(datasets.epochs(0, 1), 8, worker, workers=2)) for worker in (0, 1)]
    pieces = _arrays(distribution.share_of_batches(datasets.epochs(0, 1), 8, pieces=4))
    assert len(pieces) == 4 * len(whole) and all(len(p[0]) == 2 for p in pieces)
    for step, (images, labels) in enumerate(whole):
        assert np.array_equal(np.concatenate([shares[0][step][0], shares[1][step][0]]), images)
        assert np.array_equal(np.concatenate([shares[0][step][1], shares[1][step][1]]), labels)
        assert np.array_equal(np.concatenate([p[0] for p in pieces[4 * step:4 * step + 4]]), images)
    with pytest.raises(ValueError, match="does not split evenly over 3 replicas"):
        distribution.share_of_batches(datasets.epochs(0, 1), 8, pieces=3)


def test_evaluation_shares_drop_only_the_remainder_of_the_last_batch(datasets):
    whole = np.concatenate([images for images, _ in datasets.evaluation["val"].as_numpy_iterator()])
    # 4 replicas on 2 workers: full batches of 8 stay whole, the last is cut to a multiple of 4.
    shares = [[i for i, _ in distribution.evaluation_share(datasets.evaluation["val"], worker, 2, 4)
               .as_numpy_iterator()] for worker in (0, 1)]
    assert len(whole) % 4, "the fixture should leave a remainder to drop"
    kept = len(whole) // 4 * 4
    assert np.array_equal(np.concatenate([np.concatenate(pair) for pair in zip(*shares)]), whole[:kept])


def _start(code: str, *args: str) -> subprocess.Popen:
    """``python -c code args...`` started in the repository root; ``_output`` waits for it."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})


def _output(process: subprocess.Popen) -> str:
    """The standard output of ``process``, once it has exited successfully."""
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def _tagged(output: str, tag: str) -> str:
    return next(line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(tag + " "))


@pytest.mark.slow
def test_mirrored_replicas_follow_the_single_device_trajectory(tiny_dataset):
    variants = [("none", "-"), ("mirrored", "synchronized"), ("mirrored", "-")]
    # All three at once: each is single-threaded for most of its start-up.
    processes = [_start(_TRAJECTORIES, tiny_dataset, *variant) for variant in variants]
    try:
        one, synchronized, per_replica = (json.loads(_tagged(_output(process), "RESULTS")) for process in processes)
    finally:
        for process in processes:  # the others, when one failed
            process.kill()
    results = {"one device": one, "synchronized": synchronized, "per replica": per_replica}
    assert (one["replicas"], synchronized["replicas"]) == (1, 2)
    # Stated tolerance: 1e-4 relative, float32 reduction order being the only difference.
    assert synchronized["loss"] == pytest.approx(one["loss"], rel=1e-4), results
    # The comparison can fail: per-replica BatchNorm statistics change the trajectory.
    assert per_replica["loss"] != pytest.approx(one["loss"], rel=1e-3), results


@pytest.mark.slow
def test_a_mirrored_run_writes_a_complete_portable_run_directory(tiny_dataset, tmp_path):
    run_dir = _tagged(_output(_start(_MIRRORED_RUN, f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path}",
                                     "--run_name=mirrored", "--distribution=mirrored", "--scale_lr_with_batch",
                                     *TINY_FLAGS)), "RUN")
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["distribution"] == {"name": "mirrored", "replicas": 2, "workers": 1, "learning_rate": 2e-3}
    # Saved with BatchNorm unsynchronised (the JAX backend refuses synchronized=True), trained with it.
    with zipfile.ZipFile(os.path.join(run_dir, "model.keras")) as archive:
        saved = archive.read("config.json").decode()
    assert '"synchronized": false' in saved and '"synchronized": true' not in saved


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_together_and_leave_one_run_directory(tiny_dataset, tmp_path):
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    command = [sys.executable, "-m", "xray_tf.train", f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path}",
               "--distribution=multi_worker", *TINY_FLAGS]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CONFIG": json.dumps(tf_config)}
        processes.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "Run directory:" in outputs[0][0]
    assert "the chief worker wrote the run directory" in outputs[1][0]
    assert "2 replica(s) on 2 worker(s), this is worker 1" in outputs[1][1]
    (run_dir,) = os.listdir(tmp_path)
    present = set(os.listdir(tmp_path / run_dir))
    assert {"flags.txt", "classes.json", "history.csv", "model.keras", "saved_model", "metrics.json"} <= present
    assert "backup" not in present
    metrics = json.loads((tmp_path / run_dir / "metrics.json").read_text())
    assert metrics["distribution"]["replicas"] == 2 and metrics["distribution"]["workers"] == 2


def test_bad_distribution_settings_fail_before_any_data_is_read(monkeypatch):
    with pytest.raises(config_lib.ConfigError, match="^distribution='ring': not one of"):
        config_lib.TrainConfig(distribution="ring", data_dir=None).validate()
    with pytest.raises(config_lib.ConfigError, match="^distribution='multi_worker': needs the JAX backend"):
        with distribution.activate("multi_worker"):
            pass
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the cluster"):
        distribution.cluster_from_tf_config()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]},
                                                "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ValueError, match="does not place this task"):
        distribution.cluster_from_tf_config()
    setup = distribution.Setup("mirrored", replicas=3, workers=1, worker=0, is_chief=True)
    with pytest.raises(config_lib.ConfigError, match="^batch_size=32: must be a multiple of the 3 replicas"):
        setup.check_batch_size(32)


def test_tf_config_gives_every_process_its_place_chief_first(monkeypatch):
    cluster = {"chief": ["c:1"], "worker": ["w:1", "w:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert distribution.cluster_from_tf_config() == (["c:1", "w:1", "w:2"], 2)
