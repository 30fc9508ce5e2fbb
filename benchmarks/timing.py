"""Wall-clock callbacks the benchmarks share: the seconds of each epoch, and where ``fit``'s epochs began and ended."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:
    import tensorflow as tf


class EpochClock(keras.callbacks.Callback):
    """Wall seconds of each epoch; Keras reads the epoch's logs at its end, so device work is included."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


class FitClock(keras.callbacks.Callback):
    """When ``fit`` began its first epoch and ended its last, as ``time.perf_counter`` values.

    Its marks fall after the callbacks before it in ``fit``'s list have begun or ended the epoch:
    put last (``training.run`` puts extra callbacks after its own), it counts their work at each
    epoch's end (a history row, a backup handed to its writer) in the epochs, and their
    ``on_train_end`` (waiting for the last backup) after them.
    """

    def __init__(self):
        super().__init__()
        self.first_epoch_begin = self.last_epoch_end = math.nan

    def on_train_begin(self, logs=None):
        self.first_epoch_begin = self.last_epoch_end = math.nan

    def on_epoch_begin(self, epoch, logs=None):
        if math.isnan(self.first_epoch_begin):
            self.first_epoch_begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch_end = time.perf_counter()

    def split(self, start: float, end: float) -> dict[str, float]:
        """The seconds from ``start`` to ``end`` (``perf_counter`` values around ``fit``) in three parts.

        ``before_first_epoch``: from ``start`` until the first epoch began; ``training``: from then
        until the last epoch ended; ``after_last_epoch``: from then until ``end``.
        """
        if math.isnan(self.last_epoch_end):
            raise RuntimeError("no epoch has ended with this clock among fit's callbacks")
        return {"before_first_epoch": self.first_epoch_begin - start,
                "training": self.last_epoch_end - self.first_epoch_begin,
                "after_last_epoch": end - self.last_epoch_end}


def timed_fit(model: keras.Model, feed: tf.data.Dataset, steps: int, epochs: int) -> list[float]:
    """Fit ``model`` on ``feed``, ``epochs`` of ``steps`` steps without validation; each epoch's wall seconds."""
    clock = EpochClock()
    model.fit(feed, steps_per_epoch=steps, epochs=epochs, shuffle=False, verbose=0, callbacks=[clock])
    return clock.seconds
