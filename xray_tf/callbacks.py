"""The Keras callbacks of a training run: the history file, the non-finite stop, the epoch backup and
the best epoch, early stopping, and the time estimate."""

from __future__ import annotations

import concurrent.futures
import csv
import datetime
import io
import logging
import math
import os
import time

import keras
import numpy as np
from keras import ops

from xray_tf import checkpoint, rundir

logger = logging.getLogger(__name__)


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


class BestEpoch(keras.callbacks.Callback):
    """The best epoch so far by ``monitor``: the lowest ``val_loss``, or the highest of another metric.

    ``kept_rows`` (the ``history.csv`` rows a resumed run keeps) carry its best epoch so far. An
    epoch stopped by ``StopOnNonFiniteLoss`` (placed before this) does not count.
    """

    def __init__(self, monitor: str = "val_loss", kept_rows: list[dict[str, float]] = ()):
        super().__init__()
        self.monitor = monitor
        self._sign = 1.0 if monitor.endswith("loss") else -1.0  # minimise sign * value
        self._score, self.best_epoch = math.inf, None  # None until an epoch has a finite value; 1-based
        for row in kept_rows:
            self._consider(row.get(monitor), int(row["epoch"]))

    @property
    def value(self) -> float | None:
        """``monitor``'s value in the best epoch."""
        return None if self.best_epoch is None else self._sign * self._score

    def _consider(self, value: float | None, epoch: int) -> None:
        if value is not None and self._sign * float(value) < self._score:  # NaN is never less
            self._score, self.best_epoch = self._sign * float(value), epoch

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.stop_training:
            self._consider((logs or {}).get(self.monitor), epoch + 1)


class EpochBackup(keras.callbacks.Callback):
    """After each epoch, the training state as a ``checkpoint`` backup, written in the background.

    Two backups are kept: the newest, to resume from, and the one of ``best``'s epoch (placed
    before this), from which ``checkpoint.write_best_model`` writes ``model.keras`` when training
    ends, so no improving epoch pays for saving a model. An epoch stopped by
    ``StopOnNonFiniteLoss`` is not backed up: resuming starts from the last finite weights.

    Writing a backup takes about as long as a GPU epoch, so the state is copied to host memory
    here, which is quick, and a thread writes it while the next epoch trains. One backup is in
    flight at a time: the next one, and the end of training, wait for it and raise its error if
    it failed. A failed write (a full disk) also stops training at the next step, so the error is
    reported while the epoch it concerns is the newest, and not a whole epoch later.
    """

    def __init__(self, backup_dir: str, best: BestEpoch | None = None):
        """``best``: None keeps the newest backup only."""
        super().__init__()
        self.backup_dir = backup_dir
        self.best = best
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
        arrays = [ops.convert_to_numpy(variable) for variable in checkpoint.training_state(self.model)]
        state = checkpoint.pack_state(arrays, self._buffer)
        self._buffer = state["bytes"]
        path = checkpoint.backup_path(self.backup_dir, epoch + 1)
        best_epoch = self.best.best_epoch if self.best else None
        keep = {path} if best_epoch is None else {path, checkpoint.backup_path(self.backup_dir, best_epoch)}
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


class EarlyStop(keras.callbacks.Callback):
    """Stops training once ``patience`` epochs have passed since ``best``'s epoch.

    Counted from the best epoch, which a resumed run restores, rather than by a counter of its own
    as Keras' ``EarlyStopping`` does, so a resumed run stops where the uninterrupted one would.
    Place it after ``best`` and after the epoch's backup.
    """

    def __init__(self, best: BestEpoch, patience: int):
        super().__init__()
        self.best, self.patience = best, patience
        self.stopped_after: int | None = None  # the 1-based epoch after which it stopped

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return  # stopped for another reason
        if self.best.best_epoch is not None and epoch + 1 - self.best.best_epoch >= self.patience:
            self.stopped_after = epoch + 1
            self.model.stop_training = True


class RunEstimate(keras.callbacks.Callback):
    """Logs, after the first epoch of a fit, how long the remaining epochs should take and when they end.

    The first epoch includes compiling, so the estimate errs long.
    """

    def __init__(self, last_epoch: int):
        super().__init__()
        self.last_epoch = last_epoch  # 0-based epochs stop before it
        self._start: float | None = None
        self._told = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._start is None:
            self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        remaining = self.last_epoch - epoch - 1
        if self._told or remaining <= 0:
            return
        self._told = True
        seconds = (time.perf_counter() - self._start) * remaining
        end = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
        logger.info("Epoch %d took %s; the %d remaining epoch(s) should take about %s (until about %s).",
                    epoch + 1, _duration(seconds / remaining), remaining, _duration(seconds), end.strftime("%H:%M"))


def _duration(seconds: float) -> str:
    """``3725`` -> ``"1 h 2 min"``: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
