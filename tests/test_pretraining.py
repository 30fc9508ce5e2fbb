"""Pretraining end to end on tiny synthetic images: the loss falls, every artifact is written, a stopped
run resumes to the uninterrupted one's weights, the labels are never read, and the backbone loads
into the classifier of the same backbone (and is refused by another)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import h5py
import keras
import numpy as np
import pandas as pd
import pytest

from xray_tf import models, pretraining, rundir, synthetic
from xray_tf.config import ConfigError
from xray_tf.pretrain_config import PretrainConfig

TINY = dict(model="mobilenetv3small", image_size=32, batch_size=8, embedding_dim=64, epochs=3, learning_rate=3e-3,
            schedule="constant")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A synthetic dataset in the csv layout (path,label,split), small images."""
    return synthetic.write_dataset(str(tmp_path_factory.mktemp("pretrain") / "csv"), num_train=40, num_test=8,
                                   layout="csv", min_size=40, max_size=64)


def _config(images: str, output_dir: str, run_name: str, **changes) -> PretrainConfig:
    return PretrainConfig(images=(images,), output_dir=output_dir, run_name=run_name, **{**TINY, **changes})


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory) -> pretraining.Pretrained:
    return pretraining.run(_config(dataset, str(tmp_path_factory.mktemp("runs")), "reference"), verbose=0)


def _backbone_weights(path: str) -> list[np.ndarray]:
    """Every array of a ``.weights.h5`` file, in the file's order."""
    arrays = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    """As if the run were killed once epoch 1 was backed up."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


@pytest.mark.slow
def test_pretraining_lowers_its_loss_and_writes_every_artifact(finished, dataset):
    run_dir = finished.run_dir
    assert sorted(os.listdir(run_dir)) == sorted([rundir.FLAGS, rundir.HISTORY, rundir.PRETRAIN_IMAGES,
                                                  rundir.BACKBONE_WEIGHTS, rundir.BACKBONE_INFO])  # no backup left
    history = pd.read_csv(os.path.join(run_dir, rundir.HISTORY))
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert history["learning_rate"].tolist() == pytest.approx([3e-3] * 3)
    assert (history["embedding_std"] > 0.01).all()  # not collapsed: 1/sqrt(64) = 0.125 is spread out
    assert PretrainConfig.from_flagfile(os.path.join(run_dir, rundir.FLAGS)) == _config(
        dataset, os.path.dirname(run_dir), "reference")
    images = pd.read_csv(os.path.join(run_dir, rundir.PRETRAIN_IMAGES))["path"].tolist()
    labels = pd.read_csv(os.path.join(dataset, "labels.csv"))
    outside_test = labels[labels["split"] != "test"]["path"].map(lambda path: os.path.join(dataset, path))
    assert images == sorted(outside_test)  # every image outside the test split, sorted
    info = json.load(open(os.path.join(run_dir, rundir.BACKBONE_INFO)))
    assert info["model"] == "mobilenetv3small" and info["method"] == "vicreg" and info["images"] == len(images)


@pytest.mark.slow
def test_the_backbone_loads_into_the_classifier_of_the_same_backbone(finished):
    weights = os.path.join(finished.run_dir, rundir.BACKBONE_WEIGHTS)
    classifier = models.build_model("mobilenetv3small", 3, 32, weights=weights)
    loaded = next(layer for layer in classifier.layers if isinstance(layer, keras.Model)).get_weights()
    pretrained = models.backbone_of(finished.model.encoder).get_weights()
    assert len(loaded) == len(pretrained) > 0
    for mine, theirs in zip(loaded, pretrained):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow
def test_another_backbone_refuses_the_weights_naming_the_pretrained_one(finished, tmp_path):
    weights = os.path.join(finished.run_dir, rundir.BACKBONE_WEIGHTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras' warning per skipped layer stays inside the refusal
        with pytest.raises(ConfigError) as refusal:
            models.build_model("resnet50", 3, 32, weights=weights)
    message = str(refusal.value)
    assert "holds a mobilenetv3small backbone" in message and "--model=mobilenetv3small" in message
    alone = shutil.copy(weights, tmp_path / "backbone.weights.h5")  # without backbone.json: Keras' reason, short
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="does not fit a resnet50 backbone") as refusal:
            models.build_model("resnet50", 3, 32, weights=str(alone))
    assert len(str(refusal.value)) < 500


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_uninterrupted_weights(finished, dataset):
    output_dir = os.path.dirname(finished.run_dir)
    config = _config(dataset, output_dir, "stopped")
    stopped = pretraining.run(config, verbose=0, extra_callbacks=[_StopAfterFirstEpoch()])
    assert len(stopped.history) == 1 and not os.path.exists(os.path.join(stopped.run_dir, rundir.BACKBONE_WEIGHTS))
    assert os.listdir(os.path.join(stopped.run_dir, rundir.BACKUP)) == ["epoch-0001.npz"]
    resumed = pretraining.run(dataclasses.replace(config, resume=True), verbose=0)
    assert resumed.run_dir == stopped.run_dir
    pd.testing.assert_frame_equal(resumed.history.drop(columns=["epoch_seconds", "train_images_per_second"]),
                                  finished.history.drop(columns=["epoch_seconds", "train_images_per_second"]))
    for mine, theirs in zip(*(_backbone_weights(os.path.join(run, rundir.BACKBONE_WEIGHTS))
                              for run in (resumed.run_dir, finished.run_dir))):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow
def test_labels_are_never_read(finished, dataset, tmp_path):
    shuffled = tmp_path / "shuffled"
    shutil.copytree(dataset, shuffled)
    table = pd.read_csv(shuffled / "labels.csv")
    table["label"] = np.random.default_rng(0).permutation(table["label"].to_numpy())
    table.to_csv(shuffled / "labels.csv", index=False)
    result = pretraining.run(_config(str(shuffled), str(tmp_path), "shuffled"), verbose=0)
    pd.testing.assert_frame_equal(result.history.drop(columns=["epoch_seconds", "train_images_per_second"]),
                                  finished.history.drop(columns=["epoch_seconds", "train_images_per_second"]))
    for mine, theirs in zip(*(_backbone_weights(os.path.join(run, rundir.BACKBONE_WEIGHTS))
                              for run in (result.run_dir, finished.run_dir))):
        np.testing.assert_array_equal(mine, theirs)


def test_resume_refuses_a_finished_run_other_settings_and_no_run(tmp_path, dataset):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    config = _config(dataset, str(tmp_path), "done", resume=True)
    rundir.write_text(str(run_dir / rundir.FLAGS), dataclasses.replace(config, epochs=5).to_flagfile())
    with pytest.raises(rundir.RunError, match="--epochs was 5, now 3"):
        pretraining.run(config)
    rundir.write_json(str(run_dir / rundir.BACKBONE_INFO), {})
    with pytest.raises(rundir.RunError, match="has finished"):
        pretraining.run(config)
    with pytest.raises(rundir.RunError, match="nothing to resume"):
        pretraining.run(dataclasses.replace(config, run_name="never"))


def test_resume_refuses_other_images_than_the_run_started_on(tmp_path, dataset):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    config = _config(dataset, str(tmp_path), "killed", resume=True)
    rundir.write_text(str(run_dir / rundir.FLAGS), config.to_flagfile())
    rundir.write_text(str(run_dir / rundir.PRETRAIN_IMAGES), "path\n/elsewhere/old.png\n")
    with pytest.raises(rundir.RunError, match=r"started on 1 images .* new \(e.g. .*\), 1 gone \(e.g. /elsewhere"):
        pretraining.run(config)


def test_a_batch_larger_than_the_images_is_refused_before_any_run_directory(tmp_path, dataset):
    with pytest.raises(ConfigError, match="batch_size=1000: more than the"):
        pretraining.run(_config(dataset, str(tmp_path / "runs"), "big", batch_size=1000))
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vicreg", "simsiam"])
def test_each_method_trains_every_part_of_its_model(method, tmp_path):
    model = pretraining.build_model(PretrainConfig(images=(str(tmp_path),), method=method, **TINY))
    assert (model.predictor is not None) == (method == "simsiam")
    before = [keras.ops.convert_to_numpy(weight).copy() for weight in model.trainable_weights]
    views = np.random.default_rng(0).integers(0, 256, (2, 8, 32, 32, 1), dtype=np.uint8)
    logs = model.fit(x=(views[0], views[1]), batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0]) and 0 < logs["embedding_std"][0] < 1
    after = [keras.ops.convert_to_numpy(weight) for weight in model.trainable_weights]
    changed = [not np.array_equal(old, new) for old, new in zip(before, after)]
    assert all(changed)  # the encoder, the projector (and the predictor) all learn
