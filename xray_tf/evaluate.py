"""``python -m xray_tf.evaluate --run_dir=RUN [--data_dir=...] [--split=test|val]``: measure a run's model.

Loads ``RUN/model.keras`` (the epoch with the lowest validation loss), rebuilds the data index with
the run's own task, val_fraction and seed -- so ``--split=val`` holds exactly the validation images
the run selected its model on -- predicts every image of the split and writes into the run directory:

* ``metrics_<split>.json``: accuracy, balanced accuracy, macro F1 and macro ROC AUC; per class the
  precision, recall (sensitivity), specificity, F1 and one-vs-rest ROC AUC (``null`` where undefined,
  e.g. for a class with no images in the split); the confusion matrix; and, under ``paper_metric``,
  the paper's own "average accuracy over epochs" from ``history.csv``;
* ``confusion_matrix_<split>.png`` and ``roc_<split>.png``;
* ``predictions_<split>.csv``: per image, its file, true class and each class's probability, so every
  number above can be recomputed.

``--data_dir`` evaluates on another copy of the data, typically the full Kaggle download whose TEST
split the shared development copy withholds. Importing this module defines no flags.
"""

from __future__ import annotations

import logging
import os
import sys

import keras
import numpy as np
import pandas as pd
from absl import app, flags

from xray_tf import artifacts, compile_cache, data, metrics, models, pipeline, plots, reports
from xray_tf.config import TrainConfig

logger = logging.getLogger(__name__)

EVALUATION_SPLITS = ("test", "val")
PAPER_METRIC_NOTE = (
    "The paper's metric: the mean over all epochs of the per-epoch accuracies in history.csv (train: "
    "augmented, class-balanced batches during each epoch; val: after each epoch). It is not the "
    "accuracy of any one model; the model evaluated here is the one with the lowest val_loss."
)


def _run_settings(run_dir: str) -> dict:
    """What evaluation must share with training, from flags.txt (TrainConfig defaults where absent)."""
    values = reports.read_flags(run_dir)
    defaults = TrainConfig()
    try:
        return {
            "task": values.get("task", defaults.task),
            "val_fraction": float(values.get("val_fraction", defaults.val_fraction)),
            "seed": int(values.get("seed", defaults.seed)),
            "image_size": int(values.get("image_size", defaults.image_size)),
            "data_dir": values.get("data_dir"),
        }
    except ValueError as error:
        raise reports.RunError(f"{os.path.join(run_dir, 'flags.txt')}: {error}") from None


def _load_model(run_dir: str, image_size: int) -> keras.Model:
    path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(path):
        raise reports.RunError(f"{path}: no such file (the run did not finish its first epoch?).")
    model = models.load_model(path)
    if model.input_shape[1:3] != (image_size, image_size):
        raise reports.RunError(f"{path}: takes {model.input_shape[1:3]} images but flags.txt says {image_size}.")
    return model


def _predict(model: keras.Model, frame: pd.DataFrame, image_size: int, batch_size: int) -> np.ndarray:
    """Class probabilities ``[len(frame), k]`` for the frame's images, in row order, unaugmented.

    Every image is decoded first, as training does, so that unreadable files are all named in one
    error before any prediction is made.
    """
    decoded = pipeline.decode_images(frame["path"], image_size, keep="memory")
    if decoded.unreadable:
        raise data.DataError(f"{len(decoded.unreadable)} image file(s) cannot be decoded:\n"
                             f"{pipeline.list_unreadable(decoded.unreadable)}")
    images = decoded.images  # in the frame's row order
    batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
    return models.predict_batches(model, batches, batch_size).astype(np.float64)  # NumPy feeds every backend


def evaluate_run(run_dir: str, split: str = "test", data_dir: str | None = None, batch_size: int = 32) -> dict:
    """Evaluate the run's kept model on ``split``, write the metrics, figures and predictions, return the metrics."""
    if split not in EVALUATION_SPLITS:
        raise ValueError(f"--split={split!r} is not one of {', '.join(EVALUATION_SPLITS)}.")
    if batch_size <= 0:
        raise ValueError(f"--batch_size={batch_size} must be positive.")
    if not os.path.isdir(run_dir):
        raise ValueError(f"--run_dir={run_dir!r} is not a directory.")
    settings = _run_settings(run_dir)
    metrics_path = os.path.join(run_dir, "metrics.json")
    training = reports.read_json(metrics_path) if os.path.isfile(metrics_path) else {}
    training_data_dir = training.get("data_dir") or settings["data_dir"]  # metrics.json's is absolute
    data_dir = data_dir or training_data_dir
    if not data_dir:
        raise ValueError(f"--run_dir={run_dir!r} does not say which data it was trained on; pass --data_dir.")
    class_names = tuple(reports.read_json(os.path.join(run_dir, "classes.json")))
    paper_metric = reports.average_accuracy_over_epochs(reports.read_history(run_dir))

    index = data.load_index(data_dir, settings["task"], settings["val_fraction"], settings["seed"])
    if index.class_names != class_names:
        raise ValueError(f"--data_dir={data_dir!r} gives classes {list(index.class_names)}; the run has "
                         f"{list(class_names)} (classes.json).")
    frame = index.split(split)
    if frame.empty:
        hint = (" (no TEST rows in its metadata: the shared development copy withholds TEST; use --split=val, "
                "or --data_dir=the full download)") if split == "test" else ""
        raise ValueError(f"--split={split}: --data_dir={data_dir!r} has no {split} images{hint}.")
    same_data = training_data_dir is not None and os.path.realpath(data_dir) == os.path.realpath(training_data_dir)
    trained_counts = training.get("images", {}).get(split)
    if same_data and trained_counts is not None and trained_counts != index.class_counts(split):
        logger.warning("The %s split of %s now has %s images per class; training saw %s. The data changed "
                       "since training.", split, data_dir, index.class_counts(split), trained_counts)
    if same_data and training.get("synthetic_data"):
        logger.warning("Evaluating on SYNTHETIC data (%s): the numbers say nothing about real X-rays.", data_dir)

    model = _load_model(run_dir, settings["image_size"])
    probabilities = _predict(model, frame, settings["image_size"], batch_size)
    y_true = frame["label_index"].to_numpy()
    matrix = metrics.confusion_matrix(y_true, np.argmax(probabilities, axis=-1), len(class_names))
    report = metrics.classification_report(matrix, class_names, y_true, probabilities)
    result = {
        "run_dir": os.path.abspath(run_dir),
        "split": split,
        "data_dir": os.path.abspath(data_dir),
        "trained_on_synthetic_data": training.get("synthetic_data"),
        "model": "model.keras",
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
    artifacts.write_json_atomic(os.path.join(run_dir, f"metrics_{split}.json"), result)
    predictions = frame[["file", "label"]].reset_index(drop=True)
    for i, name in enumerate(class_names):
        predictions[f"p_{metrics.metric_suffix(name)}"] = probabilities[:, i]
    predictions["predicted"] = [class_names[i] for i in np.argmax(probabilities, axis=-1)]
    artifacts.write_text_atomic(os.path.join(run_dir, f"predictions_{split}.csv"), predictions.to_csv(index=False))

    title = f"{os.path.basename(os.path.normpath(run_dir))}: {split} ({result['num_images']} images)"
    plots.save(plots.confusion_matrix_figure(np.array(result["confusion_matrix"]), class_names, title),
               os.path.join(run_dir, f"confusion_matrix_{split}.png"))
    curves = {name: metrics.roc_curve(y_true == i, probabilities[:, i]) for i, name in enumerate(class_names)}
    plots.save(plots.roc_figure(curves, result["per_class"], title), os.path.join(run_dir, f"roc_{split}.png"))


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


def _cli() -> None:
    """``python -m xray_tf.evaluate``; flags are defined here so importing the module defines none."""
    run_dir = flags.DEFINE_string("run_dir", None, "Run directory written by python -m xray_tf.train.", required=True)
    data_dir = flags.DEFINE_string("data_dir", None, "CoronaHack folder to evaluate on (default: the run's own).")
    split = flags.DEFINE_enum("split", "test", list(EVALUATION_SPLITS),
                              "test: the TEST split (absent from the shared copy); val: the run's validation split.")
    batch_size = flags.DEFINE_integer("batch_size", 32, "Images per prediction batch.")
    cache = flags.DEFINE_string("compilation_cache", compile_cache.AUTO, compile_cache.FLAG_HELP)

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        try:
            compile_cache.enable(cache.value)
            result = evaluate_run(run_dir.value, split.value, data_dir.value, batch_size.value)
        except (ValueError, FileNotFoundError) as error:  # DataError and RunError are ValueErrors
            sys.exit(f"xray_tf.evaluate: error: {error}")
        print(summary(result))
        print(f"Wrote metrics_{split.value}.json, confusion_matrix_{split.value}.png, roc_{split.value}.png "
              f"and predictions_{split.value}.csv in {run_dir.value}")

    app.run(main)


if __name__ == "__main__":
    _cli()
