"""Measuring a model: one evaluation for training's final report and for ``xray-evaluate``.

``evaluate_model`` predicts a split's images and reports accuracy, balanced accuracy, macro F1
and macro ROC AUC, and per class the precision, recall (sensitivity), specificity, F1 and
one-vs-rest ROC AUC (``null`` where undefined). ``evaluate_run`` applies it to a finished run's
kept model: it rebuilds the data index with the run's own task, val_fraction and seed -- so the
val split holds exactly the validation images the run selected its model on -- and writes into
the run directory:

* ``metrics_<split>.json``: that report, the confusion matrix and, under ``paper_metric``, the
  paper's own "average accuracy over epochs" from ``history.csv``;
* ``confusion_matrix_<split>.png`` and ``roc_<split>.png``;
* ``predictions_<split>.csv``: per image, its file, true class and each class's probability, so every
  number above can be recomputed.

Another ``data_dir`` evaluates on another copy of the data, typically the full Kaggle download
whose TEST split the shared development copy withholds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import pandas as pd

from xray_tf import data, image_cache, metrics, models, plots, reports, rundir
from xray_tf.config import EVALUATION_SPLITS, ConfigError
from xray_tf.decode import list_unreadable

logger = logging.getLogger(__name__)

PAPER_METRIC_NOTE = (
    "The paper's metric: the mean over all epochs of the per-epoch accuracies in history.csv (train: "
    "augmented, class-balanced batches during each epoch; val: after each epoch). It is not the "
    "accuracy of any one model; the model evaluated here is the one with the lowest val_loss."
)


def evaluate_model(model: keras.Model, batches: Iterable[np.ndarray], y_true: Sequence[int],
                   class_names: Sequence[str], batch_size: int) -> tuple[dict, np.ndarray]:
    """``(classification report, probabilities [n, k])`` of ``model`` on the images of ``batches``.

    ``y_true`` holds the class index of each image, in the order of ``batches``.
    """
    probabilities = models.predict_batches(model, batches, batch_size).astype(np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) != len(probabilities):
        raise ValueError(f"{len(y_true)} labels for {len(probabilities)} images.")
    matrix = metrics.confusion_matrix(y_true, np.argmax(probabilities, axis=-1), len(class_names))
    return metrics.classification_report(matrix, class_names, y_true, probabilities), probabilities


def _load_model(run_dir: str, image_size: int) -> keras.Model:
    path = os.path.join(run_dir, rundir.MODEL)
    if not os.path.isfile(path):
        raise rundir.RunError(f"{path}: no such file (the run has not finished?).")
    model = models.load_model(path)
    if model.input_shape[1:3] != (image_size, image_size):
        raise rundir.RunError(f"{path}: takes {model.input_shape[1:3]} images but {rundir.FLAGS} says {image_size}.")
    return model


def _decoded(frame: pd.DataFrame, image_size: int) -> np.ndarray:
    """The frame's images, decoded as training does, so that every unreadable file is named in one error."""
    decoded = image_cache.decode_images(frame["path"], image_size, keep="memory")
    if decoded.unreadable:
        raise data.DataError(f"{len(decoded.unreadable)} image file(s) cannot be decoded:\n"
                             f"{list_unreadable(decoded.unreadable)}")
    return decoded.images


def evaluate_run(run_dir: str, split: str = "test", data_dir: str | None = None, batch_size: int = 32) -> dict:
    """Evaluate the run's kept model on ``split``, write the metrics, figures and predictions, return the metrics."""
    if split not in EVALUATION_SPLITS:
        raise ConfigError("split", split, f"not one of {', '.join(EVALUATION_SPLITS)}.")
    if batch_size <= 0:
        raise ConfigError("batch_size", batch_size, "must be positive.")
    if not os.path.isdir(run_dir):
        raise ConfigError("run_dir", run_dir, "not a directory.")
    config = rundir.read_config(run_dir)
    training = rundir.read_metrics(run_dir) if rundir.is_finished(run_dir) else {}
    training_data_dir = training.get("data_dir") or config.data_dir  # metrics.json's is absolute
    data_dir = data_dir or training_data_dir
    if not data_dir:
        raise ConfigError("data_dir", None, f"the run {run_dir} does not say which data it was trained on.")
    class_names = tuple(rundir.read_classes(run_dir))
    paper_metric = reports.average_accuracy_over_epochs(rundir.read_history(run_dir))

    index = data.load_index(data_dir, config.task, config.val_fraction, config.seed)
    if index.class_names != class_names:
        raise ConfigError("data_dir", data_dir, f"gives classes {list(index.class_names)}; the run has "
                          f"{list(class_names)} ({rundir.CLASSES}).")
    frame = index.split(split)
    if frame.empty:
        hint = (" (no TEST rows in its metadata: the shared development copy withholds TEST; evaluate the val "
                "split, or the full download)") if split == "test" else ""
        raise ConfigError("split", split, f"{data_dir} has no {split} images{hint}.")
    same_data = training_data_dir is not None and os.path.realpath(data_dir) == os.path.realpath(training_data_dir)
    trained_counts = training.get("images", {}).get(split)
    if same_data and trained_counts is not None and trained_counts != index.class_counts(split):
        logger.warning("The %s split of %s now has %s images per class; training saw %s. The data changed "
                       "since training.", split, data_dir, index.class_counts(split), trained_counts)
    if same_data and training.get("synthetic_data"):
        logger.warning("Evaluating on SYNTHETIC data (%s): the numbers say nothing about real X-rays.", data_dir)

    model = _load_model(run_dir, config.image_size)
    images = _decoded(frame, config.image_size)
    batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
    y_true = frame["label_index"].to_numpy()
    report, probabilities = evaluate_model(model, batches, y_true, class_names, batch_size)
    result = {
        "run_dir": os.path.abspath(run_dir),
        "split": split,
        "data_dir": os.path.abspath(data_dir),
        "trained_on_synthetic_data": training.get("synthetic_data"),
        "model": rundir.MODEL,
        "model_selection": training.get("model_selection"),
        "classes": list(class_names),
        **report,
        "paper_metric": {"name": "average accuracy over epochs", "note": PAPER_METRIC_NOTE, **paper_metric},
    }
    _write_outputs(run_dir, split, result, frame, y_true, probabilities)
    return result


def _write_outputs(
    run_dir: str, split: str, result: dict, frame: pd.DataFrame, y_true: np.ndarray, probabilities: np.ndarray
) -> None:
    class_names = result["classes"]
    rundir.write_json(os.path.join(run_dir, rundir.metrics_of_split(split)), result)
    predictions = frame[["file", "label"]].reset_index(drop=True)
    for i, name in enumerate(class_names):
        predictions[f"p_{metrics.metric_suffix(name)}"] = probabilities[:, i]
    predictions["predicted"] = [class_names[i] for i in np.argmax(probabilities, axis=-1)]
    rundir.write_text(os.path.join(run_dir, rundir.predictions_of_split(split)), predictions.to_csv(index=False))

    title = f"{os.path.basename(os.path.normpath(run_dir))}: {split} ({result['num_images']} images)"
    plots.save(plots.confusion_matrix_figure(np.array(result["confusion_matrix"]), class_names, title),
               os.path.join(run_dir, rundir.confusion_matrix_png(split)))
    curves = {name: metrics.roc_curve(y_true == i, probabilities[:, i]) for i, name in enumerate(class_names)}
    plots.save(plots.roc_figure(curves, result["per_class"], title), os.path.join(run_dir, rundir.roc_png(split)))


def summary(result: dict) -> str:
    """A few lines for the terminal; the JSON has everything."""
    def percent(value: float | None) -> str:
        return "undefined" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"{result['split']}: {result['num_images']} images of {result['data_dir']}",
        f"  accuracy {percent(result['accuracy'])}, balanced accuracy {percent(result['balanced_accuracy'])}, "
        f"macro F1 {percent(result['macro_f1'])}, macro ROC AUC {percent(result['macro_roc_auc'])}",
    ]
    for name, stats in result["per_class"].items():
        lines.append(f"  {name:>10}: n={stats['support']:<4} sensitivity {percent(stats['recall'])}, "
                     f"specificity {percent(stats['specificity'])}, precision {percent(stats['precision'])}, "
                     f"ROC AUC {percent(stats['roc_auc'])}")
    paper = result["paper_metric"]
    lines.append(f"  paper's metric, average accuracy over epochs ({paper['epochs']}): "
                 f"train {percent(paper['train'])}, val {percent(paper['val'])}")
    return "\n".join(lines)
