"""The callbacks of a run: history.csv after every epoch, the non-finite stop, the background backup,
the best epoch, early stopping and the time estimate.

What a backup holds and how it is restored is in test_checkpoint.
"""

from __future__ import annotations

import errno
import logging
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


def _epoch_ends(callback_list: list[keras.callbacks.Callback], values: list[float], name: str) -> list[int]:
    """Feed ``{name: value}`` epoch ends to the callbacks in order; the epochs (1-based) after which none stopped."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False  # as fit sets it
    for callback in callback_list:
        callback.set_model(model)
    ran = []
    for epoch, value in enumerate(values):
        for callback in callback_list:
            callback.on_epoch_end(epoch, {name: value})
        ran.append(epoch + 1)
        if model.stop_training:
            break
    return ran


@pytest.mark.parametrize("monitor, values, best_epoch", [
    ("val_loss", [3.0, 1.0, 2.0, math.nan, 0.5], 5),  # the lowest loss; NaN never wins
    ("val_balanced_accuracy", [0.3, 0.7, 0.7, math.nan, 0.6], 2),  # the highest metric; the first of a tie
])
def test_the_best_epoch_is_the_lowest_loss_or_the_highest_metric(monitor, values, best_epoch):
    best = callbacks.BestEpoch(monitor)
    _epoch_ends([best], values, monitor)
    assert best.best_epoch == best_epoch and best.value == values[best_epoch - 1]


def test_a_resumed_run_keeps_its_best_epoch_to_beat():
    best = callbacks.BestEpoch("val_macro_f1", [{"epoch": 1, "val_macro_f1": 0.4}, {"epoch": 2, "val_macro_f1": 0.8}])
    assert best.best_epoch == 2 and best.value == 0.8
    _epoch_ends([best], [0.7], "val_macro_f1")
    assert best.best_epoch == 2


def test_early_stopping_counts_epochs_since_the_best_one():
    best = callbacks.BestEpoch("val_accuracy")
    stop = callbacks.EarlyStop(best, patience=2)
    assert _epoch_ends([best, stop], [0.5, 0.6, 0.6, 0.55, 0.9], "val_accuracy") == [1, 2, 3, 4]
    assert stop.stopped_after == 4 and best.best_epoch == 2
    # Resumed after epoch 3 with the best epoch 2 restored: it stops after the same epoch.
    kept_rows = [{"epoch": epoch, "val_accuracy": value} for epoch, value in [(1, 0.5), (2, 0.6), (3, 0.6)]]
    best = callbacks.BestEpoch("val_accuracy", kept_rows)
    stop = callbacks.EarlyStop(best, patience=2)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    for callback in (best, stop):
        callback.set_model(model)
        callback.on_epoch_end(3, {"val_accuracy": 0.55})
    assert stop.stopped_after == 4 and model.stop_training


def test_the_estimate_comes_once_after_the_first_epoch(caplog):
    estimate = callbacks.RunEstimate(last_epoch=5)
    with caplog.at_level(logging.INFO, logger="xray_tf.callbacks"):
        for epoch in range(2, 5):  # a resumed run: epochs 3 to 5
            estimate.on_epoch_begin(epoch)
            estimate.on_epoch_end(epoch)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("Epoch 3 took 0 s; the 2 remaining epoch(s) should take about 0 s (until about ")
