"""The Keras callbacks of a training run: the history file, the non-finite stop, the epoch backup."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import math
import os
import time

import keras
import numpy as np
from keras import ops

from xray_tf import checkpoint, rundir


class HistoryCSV(keras.callbacks.Callback):
    """Writes ``history.csv`` (one row per finished epoch, 1-based) atomically after every epoch.

    Besides Keras' logs (loss, accuracy, per-class recall, their ``val_`` twins) each row records
    the learning rate used, the epoch's wall time and the training throughput in images/s.
    """

    def __init__(self, run_dir: str, images_per_epoch: int, rows: list[dict[str, float]] | None = None):
        """``rows``: the epochs a resumed run keeps (``resumed_rows``), continued after them."""
        super().__init__()
        self.path = os.path.join(run_dir, rundir.HISTORY)
        self.images_per_epoch = images_per_epoch
        self.rows: list[dict[str, float]] = list(rows or [])
        self._epoch_start = 0.0

    @staticmethod
    def resumed_rows(run_dir: str, last_epoch: int) -> list[dict[str, float]]:
        """The rows of ``history.csv`` for epochs 1 to ``last_epoch``: what a resumed run keeps.

        Rows after ``last_epoch`` belong to an epoch whose backup was never written; it runs again,
        so dropping them leaves every epoch in the file exactly once.
        """
        path = os.path.join(run_dir, rundir.HISTORY)
        if not os.path.isfile(path):
            return []  # killed before its first epoch ended
        # Read as written, so that a "nan" stays a value and only a column a row lacks is left out.
        with open(path, newline="") as handle:
            rows = [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]
        return [{**row, "epoch": int(row["epoch"])} for row in rows if row["epoch"] <= last_epoch]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._epoch_start
        row = {"epoch": epoch + 1}
        row.update({key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"})
        row["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["epoch_seconds"] = round(seconds, 3)
        row["train_images_per_second"] = round(self.images_per_epoch / seconds, 2)
        self.rows.append(row)
        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        rundir.write_text(self.path, buffer.getvalue())


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training after an epoch whose mean training loss is NaN or infinite.

    Keras' ``TerminateOnNaN`` reads the loss after every batch, which makes the host wait for each
    step and turns off asynchronous dispatch on the JAX backend. A NaN loss makes the epoch's
    mean NaN, so checking once per epoch catches the same runs, at the price of finishing the
    (already lost) epoch.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True


class EpochBackup(keras.callbacks.Callback):
    """After each epoch, the training state as a ``checkpoint`` backup, written in the background.

    Two backups are kept: the newest, to resume from, and the one of the epoch with the lowest
    ``val_loss`` so far (``best_epoch``), from which ``checkpoint.write_best_model`` writes
    ``model.keras`` when training ends, so no improving epoch pays for saving a model. An epoch
    stopped by ``StopOnNonFiniteLoss`` is not backed up: resuming starts from the last finite
    weights.

    Writing a backup takes about as long as a GPU epoch, so the state is copied to host memory
    here, which is quick, and a thread writes it while the next epoch trains. One backup is in
    flight at a time: the next one, and the end of training, wait for it and raise its error if
    it failed. A failed write (a full disk) also stops training at the next step, so the error is
    reported while the epoch it concerns is the newest, and not a whole epoch later. ``best`` and
    ``best_epoch`` (1-based) carry a resumed run's best epoch so far.
    """

    def __init__(self, backup_dir: str, best: float = math.inf, best_epoch: int | None = None):
        super().__init__()
        self.backup_dir = backup_dir
        self.best = best
        self.best_epoch = best_epoch  # None until an epoch has a finite val_loss
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._pending_epoch = 0  # 1-based epoch that _pending writes
        self._buffer: np.ndarray | None = None  # free to refill once the previous backup is written

    def on_train_begin(self, logs=None):
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epoch_backup")

    def on_epoch_end(self, epoch, logs=None):
        self._wait()
        if self.model.stop_training:
            return
        val_loss = (logs or {}).get("val_loss")
        if val_loss is not None and float(val_loss) < self.best:  # NaN is never less
            self.best, self.best_epoch = float(val_loss), epoch + 1
        arrays = [ops.convert_to_numpy(variable) for variable in checkpoint.training_state(self.model)]
        state = checkpoint.pack_state(arrays, self._buffer)
        self._buffer = state["bytes"]
        path = checkpoint.backup_path(self.backup_dir, epoch + 1)
        keep = {path} if self.best_epoch is None else {path, checkpoint.backup_path(self.backup_dir, self.best_epoch)}
        self._pending = self._writer.submit(self._write, path, state, keep)
        self._pending_epoch = epoch + 1
        self._pending.add_done_callback(self._stop_if_failed)

    def _stop_if_failed(self, written: concurrent.futures.Future) -> None:
        if written.exception() is not None:
            self.model.stop_training = True  # fit checks it after every step

    def on_train_end(self, logs=None):
        self._wait()
        self._writer.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()  # re-raises the writer's exception here, in the training thread
            except (OSError, rundir.RunError) as error:
                reason = str(error.strerror if isinstance(error, OSError) and error.strerror else error).rstrip(".")
                raise rundir.RunError(f"The backup of epoch {self._pending_epoch} failed, so training stopped: "
                                      f"{reason}. Once that is fixed, --resume continues after the last epoch "
                                      "backed up.") from error

    def _write(self, path: str, state: dict[str, np.ndarray], keep: set[str]) -> None:
        checkpoint.write_backup(path, state)
        for older in checkpoint.backups(self.backup_dir):
            if older not in keep:
                os.remove(older)
