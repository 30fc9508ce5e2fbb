"""Measuring a model: one evaluation for training's final report and for ``xray-evaluate``.

``evaluate_model`` predicts a split's images and reports accuracy, balanced accuracy, macro F1
and macro ROC AUC, per class the precision, recall (sensitivity), specificity, F1 and
one-vs-rest ROC AUC (``null`` where undefined), the share of images called each class, and the
expected calibration error. ``evaluate_run`` applies it to a finished run's kept model (or to an
ensemble of runs): it rebuilds the data index with the run's own task, val_fraction, seed and
split_by -- so the val split holds exactly the validation images the run selected its model on --
and writes:

* ``metrics_<split>.json``: that report with bootstrap intervals (``ci95``), the reliability bins,
  the operating points asked for and, under ``paper_metric``, the paper's own "average accuracy
  over epochs" from ``history.csv``;
* ``confusion_matrix_<split>.png``, ``roc_<split>.png``, ``pr_<split>.png``, ``reliability_<split>.png``;
* ``predictions_<split>.csv``: per image ``file`` (its path), ``true_class``, ``predicted_class``,
  ``p_<class>`` per class, ``patient`` where known and ``flag_<class>`` per operating point, so
  every number above can be recomputed (``xray-predict`` writes the same names).

Probabilities are made by ``inference``: with the run's temperature (``calibration.json``) unless
``calibrated=False``, averaged over test-time augmentation views and over an ensemble's members.
Everything chosen from data -- the temperature (``calibrate``), an operating point's threshold --
is chosen on the validation split, never on the split being reported. Another ``data_dir``
evaluates on another copy of the data (the full Kaggle download, whose TEST split the shared copy
withholds); ``eval_data`` on a labelled folder from elsewhere (split ``eval``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import pandas as pd

from xray_tf import calibration, data, export, image_cache, inference, metrics, models, plots, reports, rundir
from xray_tf.config import EVALUATION_SPLITS, ConfigError, TrainConfig
from xray_tf.decode import list_unreadable

logger = logging.getLogger(__name__)

EVAL_DATA_SPLIT = "eval"  # the split of every image of an --eval_data folder (data.load_folder_index)
PAPER_METRIC_NOTE = (
    "The paper's metric: the mean over all epochs of the per-epoch accuracies in history.csv (train: "
    "augmented, class-balanced batches during each epoch; val: after each epoch). It is not the "
    "accuracy of any one model; the model evaluated here is the one with the lowest val_loss."
)


def probability_report(probabilities: np.ndarray, y_true: Sequence[int], class_names: Sequence[str],
                       groups: Sequence[object] | None = None) -> dict:
    """The classification report of ``probabilities`` ``[n, k]`` (its argmax is the prediction) for ``y_true``.

    Adds to ``metrics.classification_report`` (bootstrap intervals over ``groups``, patient ids)
    ``absent_classes`` (no image in the split: their recall is undefined), ``predicted_share`` (the
    share of images called each class) and ``calibration`` (ECE, NLL and the reliability bins).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) != len(probabilities):
        raise ValueError(f"{len(y_true)} labels for {len(probabilities)} images.")
    predicted = np.argmax(probabilities, axis=-1)
    matrix = metrics.confusion_matrix(y_true, predicted, len(class_names))
    report = metrics.classification_report(matrix, class_names, y_true, probabilities, groups=groups)
    shares = np.bincount(predicted, minlength=len(class_names)) / len(predicted)
    report["absent_classes"] = [name for name, count in zip(class_names, matrix.sum(axis=1)) if count == 0]
    report["predicted_share"] = {name: float(share) for name, share in zip(class_names, shares)}
    bins = calibration.reliability(probabilities, y_true)
    report["calibration"] = {"ece": bins["ece"], "ece_bins": bins["bins"],
                             "nll": calibration.negative_log_likelihood(probabilities, y_true), "reliability": bins}
    return report


def evaluate_model(model: keras.Model, batches: Iterable[np.ndarray], y_true: Sequence[int],
                   class_names: Sequence[str], batch_size: int, temperature: float | None = None,
                   groups: Sequence[object] | None = None) -> tuple[dict, np.ndarray]:
    """``(probability_report, probabilities [n, k])`` of ``model`` on the images of ``batches``.

    ``y_true`` holds the class index of each image, in the order of ``batches``; ``temperature``
    scales the probabilities first (``calibration.apply_temperature``).
    """
    member = inference.keras_member(model, temperature)
    probabilities = inference.ensemble_probabilities([member], batches, batch_size)
    return probability_report(probabilities, y_true, class_names, groups), probabilities


@dataclasses.dataclass
class _Run:
    """What evaluation reads of one run directory."""

    directory: str
    config: TrainConfig
    classes: tuple[str, ...]
    training: dict  # metrics.json, {} while the run is unfinished

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory))

    def load_model(self) -> keras.Model:
        path = os.path.join(self.directory, rundir.MODEL)
        if not os.path.isfile(path):
            raise rundir.RunError(f"{path}: no such file (the run has not finished?).")
        model = models.load_model(path)
        size = self.config.image_size
        if model.input_shape[1:3] != (size, size):
            raise rundir.RunError(f"{path}: takes {model.input_shape[1:3]} images but {rundir.FLAGS} says {size}.")
        return model


def _read_run(run_dir: str) -> _Run:
    if not os.path.isdir(run_dir):
        raise ConfigError("run_dir", run_dir, "not a directory.")
    training = rundir.read_metrics(run_dir) if rundir.is_finished(run_dir) else {}
    return _Run(run_dir, rundir.read_config(run_dir), tuple(rundir.read_classes(run_dir)), training)


def _decoded(frame: pd.DataFrame, image_size: int, max_pixels: int) -> np.ndarray:
    """The frame's images, decoded as training does, so that every unreadable file is named in one error."""
    decoded = image_cache.decode_images(frame["path"], image_size, keep="memory", max_pixels=max_pixels)
    if decoded.unreadable:
        raise data.DataError(f"{len(decoded.unreadable)} image file(s) cannot be used:\n"
                             f"{list_unreadable(decoded.unreadable)}")
    return decoded.images


def _groups(frame: pd.DataFrame) -> list | None:
    return frame["patient"].tolist() if "patient" in frame.columns else None


def _check_arguments(runs: list[_Run], split: str, batch_size: int, output_dir: str | None, eval_data: str | None,
                     needs_val: bool, calibrate: bool, calibrated: bool) -> None:
    if split not in (*EVALUATION_SPLITS, EVAL_DATA_SPLIT):
        raise ConfigError("split", split, f"not one of {', '.join(EVALUATION_SPLITS)}.")
    if (split == EVAL_DATA_SPLIT) != (eval_data is not None):
        raise ConfigError("split", split, f"split {EVAL_DATA_SPLIT!r} is the whole --eval_data folder, and an "
                          f"--eval_data folder is evaluated as split {EVAL_DATA_SPLIT!r}.")
    if batch_size <= 0:
        raise ConfigError("batch_size", batch_size, "must be positive.")
    if calibrate and not calibrated:
        raise ConfigError("calibrated", calibrated, "--calibrate fits a temperature to apply it; drop one of them.")
    inference.check_compatible("run_dir", {run.directory: {"task": run.config.task, "classes": list(run.classes),
                                                           "image_size": run.config.image_size} for run in runs})
    if len(runs) > 1:
        if output_dir is None:
            raise ConfigError("output_dir", None, "several runs make an ensemble, which is no run's own result: "
                              "name a folder for its report.")
        if rundir.is_run_dir(output_dir):
            raise ConfigError("output_dir", output_dir, "is a run directory; the ensemble's report would replace "
                              "that run's own.")
    if needs_val and len(runs) > 1:
        # Runs validated on other images (other seeds) have each seen the others' validation images.
        inference.check_compatible("run_dir", {run.directory: {"val_fraction": run.config.val_fraction,
                                                               "seed": run.config.seed,
                                                               "split_by": run.config.split_by} for run in runs})


def _fit_temperatures(runs: list[_Run], keras_models: list[keras.Model], images: np.ndarray, frame: pd.DataFrame,
                      batch_size: int) -> list[float]:
    """Fit each run's temperature on the validation images, store it, and bake it into the run's exports."""
    plain = [inference.keras_member(model) for model in keras_models]
    probabilities = inference.member_probabilities(plain, inference.batches_of(images, batch_size), batch_size)
    temperatures = []
    for run, model, member_probabilities in zip(runs, keras_models, probabilities):
        fitted = calibration.calibrate(member_probabilities, frame["label_index"].to_numpy())
        saved_model = os.path.join(run.directory, rundir.SAVED_MODEL)
        # Every export the run has, again with the temperature: a server of the run gets what xray-predict gives.
        exported = [name for name, file in rundir.EXPORTS.items() if os.path.exists(os.path.join(run.directory, file))]
        export.export_model(model, run.directory, exported, fitted["temperature"])
        calibration.write_calibration(run.directory, {**fitted, "fitted_on": "val",
                                                      "saved_model": os.path.isdir(saved_model)})
        logger.info("%s: temperature %.3f fitted on %d validation images (NLL %.4f -> %.4f, ECE %.4f -> %.4f)",
                    run.name, fitted["temperature"], fitted["num_images"], fitted["nll"]["before"],
                    fitted["nll"]["after"], fitted["ece"]["before"], fitted["ece"]["after"])
        temperatures.append(fitted["temperature"])
    return temperatures


def _operating_points(points: list[calibration.OperatingPoint], class_names: Sequence[str], split: str,
                      val: tuple[pd.DataFrame, np.ndarray], evaluated: tuple[pd.DataFrame, np.ndarray],
                      how: dict) -> dict[str, dict]:
    """``key -> point``: each threshold chosen on ``val``, with its rates there and on the evaluated split."""
    chosen = {}
    for point in points:
        column = list(class_names).index(point.class_name)
        rates = {}
        for name, (frame, probabilities) in (("val", val), (split, evaluated)):
            is_class = frame["label_index"].to_numpy() == column
            if name == "val":
                try:
                    threshold = calibration.choose_threshold(is_class, probabilities[:, column], point.criterion,
                                                             point.target)
                except ValueError as error:
                    raise ConfigError("operating_point", point.key, f"cannot be chosen on the validation split: "
                                      f"{error}") from None
            rates[name] = calibration.rates_at_threshold(is_class, probabilities[:, column], threshold, _groups(frame))
        chosen[point.key] = {"class": point.class_name, "criterion": point.criterion, "target": point.target,
                             "threshold": threshold, "chosen_on": "val", **how, "rates": rates}
        if split == "val":
            chosen[point.key]["note"] = "Chosen and measured on the same images: the val rates are optimistic."
    return chosen


def evaluate_run(run_dir: str | Sequence[str], split: str = "test", data_dir: str | None = None, batch_size: int = 32,
                 *, output_dir: str | None = None, eval_data: str | None = None, tta: str = "none",
                 calibrated: bool = True, calibrate: bool = False, operating_points: Sequence[str] = ()) -> dict:
    """Evaluate a run's kept model (or an ensemble of runs) on ``split``; write the report, figures and predictions.

    ``run_dir``: one run directory, or several, whose mean probabilities are evaluated beside each
    member's (they must share task, classes and image size, and their report goes to
    ``output_dir``, by default the one run's directory). ``eval_data``: a folder in the
    ``--extra_data`` layout, evaluated as split ``eval``. ``tta``: ``inference.TTA_MODES``.
    ``calibrate``: fit each run's temperature on its validation split first and store it
    (``calibration.json``, and its SavedModel); ``calibrated=False`` ignores stored temperatures.
    ``operating_points``: ``CLASS:sensitivity=0.95`` / ``CLASS:specificity=0.9`` specs, each threshold
    chosen on validation and stored in a single run's ``operating_points.json``. Returns the report.
    """
    run_dirs = [run_dir] if isinstance(run_dir, str) else list(run_dir)
    if not run_dirs:
        raise ConfigError("run_dir", None, "name at least one run directory.")
    runs = [_read_run(directory) for directory in run_dirs]
    needs_val = split == "val" or calibrate or bool(operating_points)
    _check_arguments(runs, split, batch_size, output_dir, eval_data, needs_val, calibrate, calibrated)
    first, class_names = runs[0], runs[0].classes
    output_dir = output_dir or first.directory
    points = calibration.parse_operating_points(operating_points, class_names)
    frames = {}
    if split != EVAL_DATA_SPLIT or needs_val:
        data_dir, frames = _run_data(first, split, data_dir, needs_val)
    if eval_data is not None:
        frames[EVAL_DATA_SPLIT] = _eval_frame(eval_data, first)

    image_size = first.config.image_size
    keras_models = [run.load_model() for run in runs]
    images = {name: _decoded(frame, image_size, first.config.max_pixels) for name, frame in frames.items()}
    if calibrate:
        temperatures = _fit_temperatures(runs, keras_models, images["val"], frames["val"], batch_size)
    else:
        temperatures = [calibration.read_temperature(run.directory) if calibrated else None for run in runs]
    members = [inference.keras_member(model, temperature, run.name)
               for run, model, temperature in zip(runs, keras_models, temperatures)]

    def predicted(name: str) -> np.ndarray:
        return inference.member_probabilities(members, inference.batches_of(images[name], batch_size), batch_size,
                                              tta)

    per_member = predicted(split)
    probabilities = per_member.mean(axis=0)
    frame = frames[split]
    y_true, groups = frame["label_index"].to_numpy(), _groups(frame)
    ensemble = len(runs) > 1
    how = {"temperature": temperatures if ensemble else temperatures[0], "tta": tta}
    result = {
        "run_dir": None if ensemble else os.path.abspath(first.directory),
        "split": split,
        "data_dir": os.path.abspath(eval_data) if split == EVAL_DATA_SPLIT else data_dir,
        "trained_on_synthetic_data": first.training.get("synthetic_data"),
        "model": rundir.MODEL,
        "model_selection": None if ensemble else first.training.get("model_selection"),
        "classes": list(class_names),
        "probabilities": {**how, "calibrated": any(t is not None for t in temperatures),
                          "ensemble_of": [os.path.abspath(run.directory) for run in runs] if ensemble else None},
        **probability_report(probabilities, y_true, class_names, groups),
    }
    if ensemble:
        result["members"] = {run.name: {**probability_report(p, y_true, class_names, groups),
                                        "paper_metric": _paper_metric(run)} for run, p in zip(runs, per_member)}
    else:
        result["paper_metric"] = _paper_metric(first)
    if points:
        val_probabilities = probabilities if split == "val" else predicted("val").mean(axis=0)
        result["operating_points"] = _operating_points(points, class_names, split, (frames["val"], val_probabilities),
                                                       (frame, probabilities), how)
        if ensemble:
            logger.info("The ensemble's thresholds are in the report only: no run owns them.")
        else:
            calibration.write_operating_points(first.directory, result["operating_points"])
    os.makedirs(output_dir, exist_ok=True)
    title_name = "ensemble of " + ", ".join(run.name for run in runs) if ensemble else first.name
    _write_outputs(output_dir, title_name, result, frame, probabilities)
    return result


def _run_data(run: _Run, split: str, data_dir: str | None, needs_val: bool) -> tuple[str, dict[str, pd.DataFrame]]:
    """``(what was read, split -> frame)``: of the run's data (or ``data_dir``), ``split`` unless it is ``eval``,
    and val if ``needs_val``."""
    config = run.config
    # metrics.json's paths are absolute; flags.txt's may be relative to where training ran
    trained_on = (run.training.get("data_dirs") or list(config.data_dir), run.training.get("data_csv", config.data_csv))
    folders, data_csv = ([data_dir], None) if data_dir else trained_on
    if not folders and not data_csv:
        raise ConfigError("data_dir", None, f"the run {run.directory} does not say which data it was trained on.")
    data_format = config.data_format if not data_dir else "auto"
    index = data.load_index(folders, config.task, config.val_fraction, config.seed, split_by=config.split_by,
                            data_format=data_format, data_csv=data_csv, class_names=config.class_names)
    data_dir = ", ".join(os.path.abspath(path) for path in [*folders, data_csv] if path)
    if index.class_names != run.classes:
        raise ConfigError("data_dir", data_dir, f"gives classes {list(index.class_names)}; the run has "
                          f"{list(run.classes)} ({rundir.CLASSES}).")
    same_data = [os.path.realpath(path) for path in folders] == [os.path.realpath(path) for path in trained_on[0]]
    frames = {}
    for name in [split] * (split != EVAL_DATA_SPLIT) + ["val"] * needs_val:
        frames[name] = index.split(name)
        if frames[name].empty:
            hint = (" (no TEST rows in its metadata: the shared development copy withholds TEST; evaluate the val "
                    "split, or the full download)") if name == "test" else ""
            raise ConfigError("split", name, f"{data_dir} has no {name} images{hint}.")
        trained_counts = run.training.get("images", {}).get(name)
        if same_data and trained_counts is not None and trained_counts != index.class_counts(name):
            logger.warning("The %s split of %s now has %s images per class; training saw %s. The data changed "
                           "since training.", name, data_dir, index.class_counts(name), trained_counts)
    if same_data and run.training.get("synthetic_data"):
        logger.warning("Evaluating on SYNTHETIC data (%s): the numbers say nothing about real X-rays.", data_dir)
    return data_dir, frames


def _eval_frame(eval_data: str, run: _Run) -> pd.DataFrame:
    index = data.load_folder_index(eval_data, run.config.task, run.classes, run.config.class_names)
    if index.excluded:
        logger.info("%s: left out %s.", eval_data, "; ".join(f"{count} ({reason})"
                                                            for reason, count in index.excluded.items()))
    absent = [name for name, count in index.class_counts(EVAL_DATA_SPLIT).items() if count == 0]
    if absent:
        logger.warning("%s has no images of %s: their recall is undefined; the report gives the share of images "
                       "called each class.", eval_data, ", ".join(absent))
    return index.split(EVAL_DATA_SPLIT)


def _paper_metric(run: _Run) -> dict:
    paper_metric = reports.average_accuracy_over_epochs(rundir.read_history(run.directory))
    return {"name": "average accuracy over epochs", "note": PAPER_METRIC_NOTE, **paper_metric}


def _write_outputs(output_dir: str, title_name: str, result: dict, frame: pd.DataFrame,
                   probabilities: np.ndarray) -> None:
    split, class_names = result["split"], result["classes"]
    rundir.write_json(os.path.join(output_dir, rundir.metrics_of_split(split)), result)
    thresholds = {point["class"]: point["threshold"] for point in result.get("operating_points", {}).values()}
    table = inference.predictions_table(frame["path"], probabilities, class_names, frame["label"], _groups(frame),
                                        thresholds)
    rundir.write_text(os.path.join(output_dir, rundir.predictions_of_split(split)), table.to_csv(index=False))

    title = f"{title_name}: {split} ({result['num_images']} images)"
    y_true = frame["label_index"].to_numpy()
    plots.save(plots.confusion_matrix_figure(np.array(result["confusion_matrix"]), class_names, title),
               os.path.join(output_dir, rundir.confusion_matrix_png(split)))
    curves = {name: metrics.roc_curve(y_true == i, probabilities[:, i]) for i, name in enumerate(class_names)}
    plots.save(plots.roc_figure(curves, result["per_class"], title), os.path.join(output_dir, rundir.roc_png(split)))
    curves = {name: metrics.precision_recall_curve(y_true == i, probabilities[:, i])
              for i, name in enumerate(class_names)}
    plots.save(plots.pr_figure(curves, title), os.path.join(output_dir, rundir.pr_png(split)))
    plots.save(plots.reliability_figure(result["calibration"]["reliability"], title),
               os.path.join(output_dir, rundir.reliability_png(split)))
