"""The backup of an unfinished run: its format, restoring it exactly, and the kept model file.

Whole runs killed and resumed through ``xray-train`` are in test_training.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT

from xray_tf import callbacks, checkpoint, data, models, optimizers, pipeline, rundir, training
from xray_tf.config import TrainConfig


def compiled_dense(units: int = 2, learning_rate: float = 0.1) -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return model


def test_packed_state_unpacks_to_the_same_arrays():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(7, np.int64), np.ones((0, 4), np.float16),
              np.array([True, False])]
    state = checkpoint.pack_state(arrays)
    unpacked = checkpoint.unpack_state(state)
    assert [(a.dtype, a.shape) for a in unpacked] == [(a.dtype, a.shape) for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(unpacked, arrays))
    again = checkpoint.pack_state([array + 1 for array in arrays[:2]] + arrays[2:], state["bytes"])
    assert again["bytes"] is state["bytes"]  # the buffer of the same size is refilled, not reallocated
    assert checkpoint.unpack_state(again)[0][1, 2] == 6


def test_backups_are_named_by_their_epoch(tmp_path):
    assert checkpoint.backup_path(str(tmp_path), 12) == str(tmp_path / "epoch-0012.npz")
    assert checkpoint.backup_epoch(checkpoint.backup_path(str(tmp_path), 12)) == 12
    for epoch in (10, 2):
        checkpoint.write_backup(checkpoint.backup_path(str(tmp_path), epoch), checkpoint.pack_state([np.zeros(2)]))
    (tmp_path / ".epoch-0011.npz.1234abcd.tmp.npz").write_bytes(b"")  # a save killed half-way
    assert checkpoint.backups(str(tmp_path)) == [str(tmp_path / "epoch-0002.npz"), str(tmp_path / "epoch-0010.npz")]


def test_epoch_backup_restores_weights_and_optimizer_state(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(16, 3)), np.zeros((16, 2))
    trained = compiled_dense()
    trained.fit(x, y, epochs=3, verbose=0, callbacks=[callbacks.EpochBackup(str(tmp_path))])
    assert os.listdir(tmp_path) == ["epoch-0003.npz"]  # older backups removed
    restored = compiled_dense()
    assert checkpoint.restore_backup(restored, str(tmp_path)) == 3
    assert len(trained.optimizer.variables) == len(restored.optimizer.variables) > 2
    pairs = zip(trained.optimizer.variables + trained.weights, restored.optimizer.variables + restored.weights)
    for mine, theirs in pairs:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs))
    assert checkpoint.restore_backup(compiled_dense(), str(tmp_path / "none")) == 0
    with pytest.raises(rundir.RunError, match="epoch-0003.npz holds the training state of another model"):
        checkpoint.restore_backup(compiled_dense(units=5), str(tmp_path))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])  # the latter wraps Adam in a LossScaleOptimizer
def test_the_best_epochs_backup_is_kept_and_becomes_the_model_file(policy, tmp_path):
    """Backups of the newest and the best epoch stay; ``write_best_model`` saves the best one's state."""
    with models.global_dtype_policy(policy):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    backup_dir = str(tmp_path / "backup")
    best = callbacks.BestEpoch("val_loss")
    backup = callbacks.EpochBackup(backup_dir, best)
    for callback in (best, backup):
        callback.set_model(model)
    backup.on_train_begin()
    states = []
    for epoch, val_loss in enumerate([3.0, 1.0, 2.0, math.nan, 4.0]):
        model.layers[0].kernel.assign(np.full((3, 2), epoch, np.float32))
        model.optimizer.iterations.assign(10 * epoch)
        states.append([keras.ops.convert_to_numpy(v) for v in checkpoint.training_state(model)])
        best.on_epoch_end(epoch, {"val_loss": val_loss})
        backup.on_epoch_end(epoch, {"val_loss": val_loss})
        backup._wait()
    backup.on_train_end()
    assert best.best_epoch == 2 and best.value == 1.0
    assert sorted(os.listdir(backup_dir)) == ["epoch-0002.npz", "epoch-0005.npz"]
    path = str(tmp_path / "model.keras")
    kept = checkpoint.write_best_model(keras.saving.serialize_keras_object(model), policy, backup_dir, 2, path)
    assert not kept.compiled  # for inference: the optimizer's state stays in the backup
    for expected, variable in zip(states[1], kept.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected)
    reloaded = models.load_model(path)  # under any policy: no optimizer to rebuild
    assert not reloaded.compiled
    np.testing.assert_array_equal(reloaded.get_weights()[0], states[1][0])
    assert checkpoint.restore_backup(model, backup_dir) == 5  # resuming takes the newest


@pytest.mark.slow
def test_the_kept_model_file_holds_the_weights_alone_and_predicts_as_the_trained_model(tmp_path):
    """``model.keras`` has no optimizer state: about the weights' size, the same probabilities as before saving."""
    keras.utils.set_random_seed(0)
    model = models.build_model("mobilenetv3small", 4, 32, weights="none")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 1), dtype=np.uint8)
    model.fit(images, keras.utils.to_categorical(np.arange(16) % 4, 4), batch_size=8, verbose=0)
    backup_dir = str(tmp_path / "backup")
    arrays = [keras.ops.convert_to_numpy(v) for v in checkpoint.training_state(model)]
    checkpoint.write_backup(checkpoint.backup_path(backup_dir, 1), checkpoint.pack_state(arrays))
    path = str(tmp_path / rundir.MODEL)
    kept = checkpoint.write_best_model(keras.saving.serialize_keras_object(model), "float32", backup_dir, 1, path)
    expected = np.asarray(model.predict_on_batch(images))
    np.testing.assert_array_equal(np.asarray(kept.predict_on_batch(images)), expected)
    np.testing.assert_array_equal(np.asarray(models.load_model(path).predict_on_batch(images)), expected)
    weight_bytes = sum(array.nbytes for array in model.get_weights())
    optimizer_bytes = sum(keras.ops.convert_to_numpy(v).nbytes for v in model.optimizer.variables)
    assert optimizer_bytes > weight_bytes  # Adam's two moments of every trainable weight: worth leaving out
    # Against the weights as Keras stores them: HDF5's own structure is ~0.4 MB of this small model's
    # 4 MB (under 1 % of a ResNet50's), which the bare array bytes would count as overhead.
    weights_file = str(tmp_path / "alone.weights.h5")
    kept.save_weights(weights_file)  # uncompiled: no optimizer in it either
    assert abs(os.path.getsize(path) - os.path.getsize(weights_file)) < 0.15 * os.path.getsize(weights_file)


def test_no_model_file_without_the_best_epochs_backup(tmp_path):
    """The model file comes from the best epoch's backup only; an older model.keras is not kept in its place."""
    model = compiled_dense()
    path = tmp_path / "model.keras"
    model.save(str(path))
    before = path.read_bytes()
    (tmp_path / "backup").mkdir()
    with pytest.raises(rundir.RunError, match=r"epoch-0002\.npz: no backup of the best epoch 2"):
        checkpoint.write_best_model(keras.saving.serialize_keras_object(model), "float32", str(tmp_path / "backup"),
                                    2, str(path))
    assert path.read_bytes() == before


def test_interrupted_and_restored_training_ends_with_the_same_final_weights(clean_dataset, tmp_path):
    """The resume mechanism on a small model in this process, on the TF and JAX backends: epochs
    0-3 in one go equal epochs 0-1, a backup, a new model restored from it, and epochs 2-3; final
    weights compared exactly."""
    index = data.load_index(clean_dataset)
    datasets = pipeline.build_datasets(index.frame, 4, pipeline.PipelineSettings(image_size=32, batch_size=8))
    pipeline.fill_caches(datasets)

    def fitted(first: int, stop: int, backup_dir: str) -> keras.Model:
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                  keras.layers.Dense(4, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
        assert checkpoint.restore_backup(model, backup_dir) == first
        rates = TrainConfig(learning_rate=1e-2, lr_decay_epochs=1)
        schedule = keras.callbacks.LearningRateScheduler(lambda epoch: optimizers.learning_rate_at(epoch, rates))
        training.fit_epochs(model, datasets, first, stop, verbose=0,
                            callbacks=[schedule, callbacks.EpochBackup(backup_dir)])
        return model

    uninterrupted = fitted(0, 4, str(tmp_path / "one_go"))
    fitted(0, 2, str(tmp_path / "interrupted"))
    resumed = fitted(2, 4, str(tmp_path / "interrupted"))
    for mine, theirs in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow
def test_the_resume_mechanism_is_exact_on_jax_too():
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=", "-W", "ignore",
         f"{__file__}::test_interrupted_and_restored_training_ends_with_the_same_final_weights"],
        cwd=REPO_ROOT, env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
