"""The Python API: ``train(config)`` runs what ``xray-train`` runs and returns what the run kept.

    import xray_tf
    result = xray_tf.train(xray_tf.TrainConfig(data_dir="coronahack", epochs=5))
    result.model.predict(images)  # uint8 [B, S, S, 1]
    result.history["val_loss"], result.metrics["splits"]["test"]["accuracy"]

Everything is read back from the run directory once the run has finished, so the result is what
``xray-evaluate``, ``xray-predict`` and ``xray-report`` see: the kept epoch's model, not the last one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import keras
import pandas as pd

from xray_tf import models, rundir, training
from xray_tf.config import TrainConfig


# eq=False: fields holding a model and a DataFrame have no meaningful ==, and a frozen dataclass
# with eq would try to hash them.
@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
    """A finished run: its directory and the files in it that a caller wants first."""

    run_dir: str
    model: keras.Model  # model.keras: the kept epoch (metrics["model_selection"]), uncompiled, for inference
    history: pd.DataFrame  # history.csv: one row per epoch
    metrics: dict  # metrics.json: every split's report, the kept epoch, timings


def train(config: TrainConfig, callbacks: Sequence[keras.callbacks.Callback] = (),
          verbose: int | str = "auto") -> TrainResult | None:
    """Train as ``config`` says (``xray_tf.training.run``) and return the finished run.

    ``callbacks`` are passed to ``fit`` after the run's own (which write the run directory);
    ``verbose`` is ``fit``'s. A setting that cannot work raises ``ConfigError`` naming the field
    before anything is read. None on the workers of a multi-worker run other than the chief, which
    alone writes the run directory.
    """
    run_dir = training.run(config, verbose=verbose, callbacks=callbacks)
    if run_dir is None:
        return None
    return TrainResult(run_dir=run_dir, model=models.load_model(os.path.join(run_dir, rundir.MODEL)),
                       history=rundir.read_history(run_dir), metrics=rundir.read_metrics(run_dir))
