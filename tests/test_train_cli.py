"""``xray-train`` (``python -m xray_tf.train``) end to end: run directory, SavedModel equivalence, JAX, real data."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import run_module, shared_data

from xray_tf import data, decode, layouts, models, rundir, synthetic
from xray_tf.config import FINE_CLASSES

pytestmark = pytest.mark.slow  # whole training runs in processes of their own

# The cheapest backbone: these tests are about the command, not the network.
TINY_RUN = ["--model=mobilenetv3small", "--weights=none", "--image_size=32", "--batch_size=16", "--epochs=2",
            "--lr_decay_epochs=1", "--loss=focal"]
ARTIFACTS = {rundir.HISTORY, rundir.FLAGS, rundir.CLASSES, rundir.METRICS, rundir.MODEL, rundir.SAVED_MODEL}

SAVED_MODEL_PROBE = """
import sys, numpy as np, tensorflow as tf
served = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
grey = served.serve(tf.constant(images)).numpy()
rgb = served.signatures["serving_default"](image=tf.constant(np.repeat(images, 3, axis=-1)))
np.save(sys.argv[3], np.stack([grey, list(rgb.values())[0].numpy()]))
assert not any(name.startswith("xray_tf") for name in sys.modules), "the probe imported xray_tf"
"""


def read_history(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "history.csv")) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """A 2-epoch CLI run with no --data_dir, i.e. on the default synthetic dataset."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        # A small stand-in where the trainer looks for its default dataset; generating the full one,
        # ten times larger, is part of the demo that test_packaging runs.
        patch.setenv("XRAY_TF_CACHE", str(root / "cache"))
        synthetic.write_dataset(synthetic.default_dataset_dir(), num_train=48, num_test=16, seed=2, min_size=40,
                                max_size=72)
    previous = os.umask(0o022)  # the usual one: files 0644, folders 0755 (test_run_files_follow_the_umask)
    try:
        result = run_module("xray_tf.train", *TINY_RUN, f"--output_dir={root / 'runs'}", "--run_name=tiny",
                            env={"XRAY_TF_CACHE": str(root / "cache")})
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(root / "runs" / "tiny"), result


def test_run_writes_every_artifact(synthetic_run):
    run_dir, _ = synthetic_run
    assert ARTIFACTS <= set(os.listdir(run_dir))
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "val_recall_covid_19"} <= set(history[0])
    assert [float(row["learning_rate"]) for row in history] == pytest.approx([1e-3, 5e-4])
    assert json.load(open(os.path.join(run_dir, "classes.json"))) == list(FINE_CLASSES)
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert set(metrics["splits"]) == {"train", "val", "test"}
    for split, report in metrics["splits"].items():
        assert report["num_images"] == sum(metrics["images"][split].values())
        assert np.array(report["confusion_matrix"]).sum() == report["num_images"]
    assert metrics["excluded_rows"] == {"Stress-Smoking, in no class": 2}
    assert metrics["compilation_cache"] is None  # the TensorFlow backend keeps no compiled programs
    assert set(metrics["seconds"]) == {"decode_and_cache", "fit", "export_and_evaluate"}


def test_run_files_follow_the_umask(synthetic_run):
    run_dir, _ = synthetic_run
    paths = [run_dir] + [os.path.join(folder, name) for folder, folders, files in os.walk(run_dir)
                         for name in folders + files]
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in paths}
    assert {path: mode for path, mode in modes.items() if mode != (0o755 if os.path.isdir(path) else 0o644)} == {}
    assert not any(os.path.basename(path).startswith(".") for path in paths)  # no temporary left behind


def test_synthetic_data_is_announced_loudly(synthetic_run):
    run_dir, result = synthetic_run
    first_line = result.stderr.splitlines()[0]  # the program's first words are its own, not TensorFlow's
    assert "SYNTHETIC DATA" in first_line
    assert json.load(open(os.path.join(run_dir, "metrics.json")))["synthetic_data"] is True


def test_flags_file_is_reusable(synthetic_run):
    """Also the one check, from outside the process, of a bad flag's exit status and message; the
    other bad flags are checked in-process (test_training)."""
    run_dir, _ = synthetic_run
    lines = open(os.path.join(run_dir, "flags.txt")).read().splitlines()
    assert "--image_size=32" in lines and "--loss=focal" in lines and "--epochs=2" in lines
    result = run_module("xray_tf.train", f"--flagfile={os.path.join(run_dir, 'flags.txt')}", "--epochs=0")
    assert result.returncode != 0 and "xray-train: error: --epochs=0: must be positive" in result.stderr


def test_saved_model_serves_without_xray_tf(synthetic_run, tmp_path):
    """The exported SavedModel, in a fresh process, equals the Keras checkpoint on the same images."""
    run_dir, _ = synthetic_run
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    index = data.load_index(metrics["data_dirs"])
    paths = index.split("test")["path"][:12]
    images = np.stack([decode.decode_image(tf.constant(p), 32).numpy() for p in paths])
    np.save(tmp_path / "images.npy", images)
    probe = subprocess.run(
        [sys.executable, "-c", SAVED_MODEL_PROBE, os.path.join(run_dir, "saved_model"),
         str(tmp_path / "images.npy"), str(tmp_path / "served.npy")],
        capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    grey, rgb = np.load(tmp_path / "served.npy")
    expected = models.load_model(os.path.join(run_dir, "model.keras")).predict(images, verbose=0)
    # float32 inference of the same graph; only the order of floating-point sums may differ.
    np.testing.assert_allclose(grey, expected, atol=1e-5)
    np.testing.assert_allclose(rgb, expected, atol=1e-5)


def test_a_second_run_with_the_same_name_gets_its_own_directory(synthetic_run):
    """The trainer creates its directory with rundir.create, which never reuses one."""
    run_dir, _ = synthetic_run
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    second = rundir.create(os.path.dirname(run_dir), "tiny")
    third = rundir.create(os.path.dirname(run_dir), "tiny")
    assert (second, third) == (run_dir + "-2", run_dir + "-3")
    assert os.listdir(second) == os.listdir(third) == []
    assert before == {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}


def test_jax_backend_runs_the_same_cli_data_parallel_on_two_devices(tiny_dataset, tmp_path):
    """The JAX backend end to end, through keras.distribution.DataParallel over 2 CPU devices, with
    a compilation cache (one run covers all three, to keep the suite short; single-device JAX
    training is in test_checkpoint)."""
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    cache = tmp_path / "xla"
    result = run_module("xray_tf.train", *TINY_RUN, f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path}",
                        "--run_name=jax", "--distribution=mirrored", f"--compilation_cache={cache}",
                        env={"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distribution mirrored (jax backend): 2 replica(s)" in result.stderr
    assert "global batch 16 = 2 x 8 per replica" in result.stderr
    run_dir = tmp_path / "jax"
    assert ARTIFACTS <= set(os.listdir(run_dir))
    assert len(read_history(str(run_dir))) == 2
    metrics = json.load(open(run_dir / "metrics.json"))
    assert metrics["distribution"]["replicas"] == 2
    assert metrics["compilation_cache"] == str(cache)
    cached = os.listdir(cache)
    assert {"train_step", "test_step", "predict_step"} <= {name.split("-")[0].removeprefix("jit_") for name in cached}
    # Exported through jax2tf without the model's gradient (export.export_saved_model): it still serves.
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    loaded = tf.saved_model.load(str(run_dir / "saved_model"))  # kept: its variables die with it
    served = loaded.serve(tf.constant(images)).numpy()
    expected = models.load_model(str(run_dir / "model.keras")).predict(images, verbose=0)
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_short_run_on_real_coronahack(tmp_path):
    """64 px on a class-stratified subset of the real images (CSV rewritten, images linked, not copied),
    with the levers and hooks that RESULTS.md's ablation on the real data does not use."""
    source = shared_data("coronahack")
    metadata = pd.read_csv(os.path.join(source, layouts.METADATA_CSV), index_col=0)
    subset = metadata.groupby(layouts.coronahack_fine_classes(metadata).fillna("none")).head(12)
    subset.to_csv(tmp_path / layouts.METADATA_CSV)
    os.symlink(os.path.join(source, layouts.IMAGE_FOLDER), tmp_path / layouts.IMAGE_FOLDER)
    result = run_module("xray_tf.train", "--model=mobilenetv3small", "--weights=none", "--image_size=64",
                        "--epochs=2", "--batch_size=16", f"--data_dir={tmp_path}",
                        f"--output_dir={tmp_path / 'runs'}", "--run_name=real", "--optimizer=adamw",
                        "--weight_decay=0.01", "--cutmix_alpha=1.0", "--freeze_backbone_epochs=1",
                        "--backbone_lr_multiplier=0.1", "--early_stopping_patience=5", "--tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "runs" / "real" / "metrics.json"))
    assert metrics["synthetic_data"] is False
    assert metrics["splits"]["val"]["num_images"] == sum(metrics["images"]["val"].values()) > 0
    assert "test" not in metrics["splits"]  # the TEST split is withheld here
    assert metrics["model_selection"]["epochs_run"] == 2
    assert sorted(os.listdir(tmp_path / "runs" / "real" / rundir.TENSORBOARD)) == ["train", "validation"]
