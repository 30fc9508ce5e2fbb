"""The callbacks of a run: history.csv after every epoch, the non-finite stop, the background backup.

What a backup holds and how it is restored is in test_checkpoint.
"""

from __future__ import annotations

import errno
import math
import os

import keras
import numpy as np
import pytest

from xray_tf import callbacks, checkpoint, rundir


def test_history_is_written_after_every_epoch_and_continued_on_resume(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(8, 3)), np.eye(2)[np.arange(8) % 2]
    model.fit(x, y, epochs=2, validation_data=(x, y), verbose=0, callbacks=[callbacks.HistoryCSV(str(tmp_path), 8)])
    history = rundir.read_history(str(tmp_path))
    assert history["epoch"].tolist() == [1, 2]
    assert {"learning_rate", "epoch_seconds", "train_images_per_second"} <= set(history.columns)
    assert history["learning_rate"].tolist() == pytest.approx([1e-3, 1e-3])
    kept = callbacks.HistoryCSV.resumed_rows(str(tmp_path), 1)
    model.fit(x, y, initial_epoch=1, epochs=3, validation_data=(x, y), verbose=0,
              callbacks=[callbacks.HistoryCSV(str(tmp_path), 8, kept)])
    resumed = rundir.read_history(str(tmp_path))
    assert resumed["epoch"].tolist() == [1, 2, 3]
    assert resumed.iloc[0].to_dict() == history.iloc[0].to_dict()


def test_resumed_rows_keep_the_epochs_of_the_backup(tmp_path):
    with open(tmp_path / rundir.HISTORY, "w") as handle:
        handle.write("epoch,loss,accuracy,val_loss,val_accuracy\n1,2.5,0.5,2.0,0.4\n2,1.5,0.6,,\n3,1.0,0.7,0.5,0.8\n")
    assert callbacks.HistoryCSV.resumed_rows(str(tmp_path), 2) == [
        {"epoch": 1, "loss": 2.5, "accuracy": 0.5, "val_loss": 2.0, "val_accuracy": 0.4},
        {"epoch": 2, "loss": 1.5, "accuracy": 0.6},
    ]
    assert callbacks.HistoryCSV.resumed_rows(str(tmp_path / "none"), 2) == []  # killed before epoch 1 ended


def test_a_non_finite_loss_stops_training_after_its_epoch():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    stop = callbacks.StopOnNonFiniteLoss()
    stop.set_model(model)
    for loss in (1.0, math.inf):
        stop.on_epoch_end(0, {"loss": loss})
        assert model.stop_training == (loss == math.inf)


def test_a_backup_that_cannot_be_written_fails_the_fit(tmp_path):
    """The backup is written by a thread; its error must still reach the training thread."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(rundir.RunError, match="^The backup of epoch 1 failed, so training stopped: Not a directory"):
        model.fit(np.zeros((4, 3)), np.zeros((4, 2)), epochs=2, verbose=0,
                  callbacks=[callbacks.EpochBackup(str(blocker / "backup"))])


class _StepsPerEpoch(keras.callbacks.Callback):
    """How many training steps each (1-based) epoch ran: a stopped epoch runs fewer."""

    def __init__(self):
        super().__init__()
        self.steps: dict[int, int] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        self.steps[self.epoch] = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps[self.epoch] += 1


def test_a_failed_backup_stops_training_at_the_next_step_and_names_its_epoch(tmp_path, monkeypatch):
    written = checkpoint.write_backup

    def full_disk_from_epoch_2(path, state):
        if checkpoint.backup_epoch(path) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written(path, state)

    monkeypatch.setattr(checkpoint, "write_backup", full_disk_from_epoch_2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    steps = _StepsPerEpoch()
    with pytest.raises(rundir.RunError) as error:
        model.fit(np.zeros((40, 3)), np.zeros((40, 2)), batch_size=4, epochs=5, verbose=0,
                  callbacks=[steps, callbacks.EpochBackup(str(tmp_path))])
    assert str(error.value) == ("The backup of epoch 2 failed, so training stopped: No space left on device. Once "
                                "that is fixed, --resume continues after the last epoch backed up.")
    # Stopped at the next step: in epoch 3, or before it began where the write failed at once (this
    # fake disk fails before writing a byte); never after all of epoch 3.
    assert steps.steps.get(3, 0) < steps.steps[1] == 10 and 4 not in steps.steps
    assert [checkpoint.backup_epoch(path) for path in checkpoint.backups(str(tmp_path))] == [1]  # resumable
