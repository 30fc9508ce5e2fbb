"""``RUN/report.html``: one run on one self-contained page, to read offline in any browser.

Sections, each from the run's own files through ``xray_tf.rundir``'s readers:

1. Settings (``flags.txt``).
2. Data: where it came from, images per class in each split, rows left out (``metrics.json``).
3. Training: the curves of ``history.csv`` (``history_plots.run_histories_figure``) and the kept epoch.
4. One section per evaluated split (``rundir.split_reports``: ``metrics_<split>.json`` before
   ``metrics.json``): the metrics with their 95 % bootstrap intervals (``ci95``; "—" where the
   report has none), the per-class numbers, and the confusion matrix, ROC, precision-recall and
   reliability figures: the run's PNG where evaluation wrote one, else drawn here from the report
   or from ``predictions_<split>.csv``.
5. Grad-CAM: for the val and test predictions, per true class the ``images_per_group`` most
   confident correct and most confident wrong images (the telling ones), each under the heatmap of
   its predicted class with that class's probability (``gradcam.annotated_overlay``).

A part the run lacks (an unfinished run has no ``metrics.json``, an unevaluated one no
predictions) is said to be absent on the page, never an error. Images are PNG ``data:`` URIs and
the style sheet is inline; the page has no script and fetches nothing, so it survives being mailed.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from xray_tf import gradcam, history_plots, inference, metrics, models, plots, predict, rundir
from xray_tf.config import MIN_IMAGE_SIZE, ConfigError

GRADCAM_SPLITS = ("val", "test")
FIGURE_DPI = 150  # figures drawn here: sharp on a screen at a quarter of a print PNG's bytes
_GRADCAM_BATCH = 16

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f3f3f3; }
.absent { color: #777; font-style: italic; }
.warning { background: #fff3cd; padding: 0.6em; border: 1px solid #e0c36a; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures img { max-width: 560px; width: 100%; height: auto; }
img.wide { max-width: 100%; height: auto; }
.cams { display: flex; flex-wrap: wrap; gap: 0.6em; } .cams figure { margin: 0; width: 240px; font-size: 0.8em; }
.cams img { width: 100%; height: auto; }
.correct img { border: 3px solid #2a9d4b; } .wrong img { border: 3px solid #c62828; }
figcaption { overflow-wrap: anywhere; }
"""


def write_report(run_dir: str, images_per_group: int = 4, overlay_size: int = 224) -> str:
    """Write ``run_dir/report.html`` (see the module's docstring) and return its path.

    ``images_per_group``: Grad-CAM overlays per true class and outcome (correct, wrong) of each
    split, 0 for none; ``overlay_size``: their side in pixels before the caption and colour bar.
    """
    if images_per_group < 0:
        raise ConfigError("images_per_group", images_per_group, "must be 0 or more.")
    if overlay_size < MIN_IMAGE_SIZE:
        raise ConfigError("overlay_size", overlay_size, f"must be at least {MIN_IMAGE_SIZE} pixels.")
    if not os.path.isdir(run_dir):
        raise rundir.RunError(f"{run_dir}: no such run directory.")
    if not rundir.is_run_dir(run_dir):
        raise rundir.RunError(f"{run_dir}: not a run directory of xray-train (neither {rundir.HISTORY} "
                              f"nor {rundir.METRICS}).")
    name = os.path.basename(os.path.normpath(run_dir))
    training = rundir.read_metrics(run_dir) if rundir.is_finished(run_dir) else None
    reports = rundir.split_reports(run_dir) if training is not None else {}
    body = [_settings(run_dir), _data(training), _training(run_dir, name, training)]
    body += [_split(run_dir, name, split, report, source) for split, (report, source) in reports.items()]
    if not reports:
        why = f"the run has no {rundir.METRICS} yet" if training is None else "no split was measured"
        body.append(_section("Evaluation", _absent(f"No evaluation: {why}.")))
    body.append(_gradcam(run_dir, images_per_group, overlay_size))
    warning = ""
    if training and training.get("synthetic_data"):
        warning = '<p class="warning">Trained on SYNTHETIC data: the numbers say nothing about real X-rays.</p>'
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(name)}: xray_tf run '
            f'report</title>\n<style>{_STYLE}</style></head>\n<body><h1>Run {_e(name)}</h1>\n'
            f'<p>{_e(os.path.abspath(run_dir))}</p>{warning}\n' + "\n".join(body) + "\n</body></html>\n")
    path = os.path.join(run_dir, rundir.REPORT)
    rundir.write_text(path, page)
    return path


# --- HTML pieces ------------------------------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value))


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def _absent(text: str) -> str:
    return f'<p class="absent">{_e(text)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str, css_class: str = "") -> str:
    source = base64.b64encode(png).decode("ascii")
    return f'<img class="{css_class}" alt="{_e(alt)}" src="data:image/png;base64,{source}">'


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _interval(bounds: Sequence[float | None] | None) -> str:
    if not bounds or any(bound is None for bound in bounds):
        return "—"
    low, high = bounds
    return f"{100 * low:.1f}–{100 * high:.1f}%"


# --- sections ---------------------------------------------------------------------------------------

def _settings(run_dir: str) -> str:
    if not os.path.isfile(os.path.join(run_dir, rundir.FLAGS)):
        return _section("Settings", _absent(f"No settings: the run has no {rundir.FLAGS}."))
    settings = dataclasses.asdict(rundir.read_config(run_dir))
    return _section("Settings", f"<p>From {rundir.FLAGS}, reusable as --flagfile.</p>",
                    _table(["Setting", "Value"], [[f"--{key}", value] for key, value in settings.items()]))


def _data(training: dict | None) -> str:
    if training is None:
        return _section("Data", _absent(f"No data summary: the run has no {rundir.METRICS} yet."))
    sources = training.get("sources") or {}
    rows = [[f"Dataset {name}", f"{source['location']} ({source['layout']} layout)"]
            for name, source in sources.items()]
    rows += [["Task", training.get("task", "—")], ["Classes", ", ".join(training.get("classes", []))]]
    absent = training.get("absent_classes")
    if absent:
        rows.append(["Absent classes", f"{', '.join(absent)}: no dataset given can hold them, so the model cannot "
                                       "name them"])
    parts = [_table(["", "Value"], rows)]
    if len(sources) > 1:  # where the images of each class came from
        names = list(training.get("classes", []))
        parts.append(_table(["Images per dataset", *names],
                            [[name, *(source["images"].get(c, 0) for c in names)] for name, source in sources.items()]))
    images = training.get("images") or {}
    if images:
        classes = list(next(iter(images.values())))
        rows = [[name, *(images[split].get(name, 0) for split in images)] for name in classes]
        rows.append(["All", *(sum(images[split].values()) for split in images)])
        patients = training.get("patients") or {}
        if patients:  # how many independent patients stand behind those images
            rows.append([f"Patients (split by {training.get('split_by', '—')})",
                         *(patients.get(split, "—") for split in images)])
        parts.append(_table(["Images per class", *images], rows))
    excluded = training.get("excluded_rows") or {}
    parts.append(_table(["Rows left out", "Rows"], list(excluded.items())) if excluded
                 else "<p>No metadata row was left out.</p>")
    return _section("Data", *parts)


def _training(run_dir: str, name: str, training: dict | None) -> str:
    if not os.path.isfile(os.path.join(run_dir, rundir.HISTORY)):
        return _section("Training", _absent(f"No training curves: the run has no {rundir.HISTORY}."))
    parts = [_image(plots.png_bytes(history_plots.run_histories_figure({name: run_dir}), FIGURE_DPI),
                    "training curves", "wide")]
    selection = (training or {}).get("model_selection")
    if selection:
        parts.insert(0, f"<p>Kept: the model of epoch {_e(selection.get('best_epoch'))} of "
                        f"{_e(selection.get('epochs_run'))}, chosen on {_e(selection.get('monitor'))} "
                        "(a star on the validation curves).</p>")
    return _section("Training", *parts)


def _split(run_dir: str, name: str, split: str, report: dict, source: str) -> str:
    ci95 = report.get("ci95") or {}
    rows = [[label, _percent(report.get(key)), _interval(ci95.get(key))]
            for key, label in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy (mean recall)"),
                               ("macro_f1", "Macro F1"), ("macro_roc_auc", "Macro ROC AUC (one-vs-rest)"))]
    calibration = report.get("calibration") or {}
    if "ece" in calibration:
        rows.append(["Expected calibration error", _percent(calibration["ece"]), _interval(ci95.get("ece"))])
    parts = [f"<p>{_e(report.get('num_images', '?'))} images; from {_e(source)}.</p>",
             _table(["Metric", "Value", "95% interval"], rows)]
    per_class = report.get("per_class") or {}
    share = report.get("predicted_share") or {}
    parts.append(_table(
        ["Class", "Images", "Precision", "Recall (sensitivity)", "95% interval", "Specificity", "95% interval",
         "F1", "ROC AUC", "Called this class"],
        [[cls, stats.get("support"), _percent(stats.get("precision")), _percent(stats.get("recall")),
          _interval(ci95.get(metrics.interval_name("recall", cls))), _percent(stats.get("specificity")),
          _interval(ci95.get(metrics.interval_name("specificity", cls))), _percent(stats.get("f1")),
          _percent(stats.get("roc_auc")), _percent(share.get(cls))] for cls, stats in per_class.items()]))
    figures = _split_figures(run_dir, split, report, f"{name}: {split} ({report.get('num_images', '?')} images)")
    parts.append('<div class="figures">' + "".join(figures) + "</div>")
    return _section(f"Split: {split}", *parts)


def _split_figures(run_dir: str, split: str, report: dict, title: str) -> list[str]:
    """The split's four figures: the run's PNG, else drawn here from what the run has, else said absent."""
    class_names = list(report.get("per_class") or {})
    scores = None
    if _has_predictions(run_dir, split):
        scores = _scores(rundir.read_predictions(run_dir, split, _probability_columns(class_names)), class_names)
    reliability = (report.get("calibration") or {}).get("reliability")

    def confusion():
        return plots.confusion_matrix_figure(np.array(report["confusion_matrix"]), class_names, title)

    def roc():
        return plots.roc_figure({c: metrics.roc_curve(is_class, score) for c, (is_class, score) in scores.items()},
                                report["per_class"], title)

    def pr():
        return plots.pr_figure({c: metrics.precision_recall_curve(is_class, score)
                                for c, (is_class, score) in scores.items()}, title)

    kinds = [("confusion matrix", rundir.confusion_matrix_png(split), confusion if "confusion_matrix" in report
              else None, "no confusion matrix in the report"),
             ("ROC curves", rundir.roc_png(split), roc if scores else None, f"no {rundir.predictions_of_split(split)}"),
             ("precision-recall curves", rundir.pr_png(split), pr if scores else None,
              f"no {rundir.predictions_of_split(split)}"),
             ("reliability diagram", rundir.reliability_png(split),
              (lambda: plots.reliability_figure(reliability, title)) if reliability else None,
              "no calibration in the report")]
    figures = []
    for what, file_name, draw, why_absent in kinds:
        path = os.path.join(run_dir, file_name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                figures.append(_image(handle.read(), f"{what}, {split}"))
        elif draw is not None:
            figures.append(_image(plots.png_bytes(draw(), FIGURE_DPI), f"{what}, {split}"))
        else:
            figures.append(_absent(f"No {what}: {why_absent}."))
    return figures


# --- predictions and Grad-CAM -----------------------------------------------------------------------

def _has_predictions(run_dir: str, split: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, rundir.predictions_of_split(split)))


def _probability_columns(class_names: Sequence[str]) -> list[str]:
    return [inference.probability_column(name) for name in class_names]


def _scores(predictions: pd.DataFrame, class_names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class: (is the image of that class, its probability of that class)."""
    return {name: (predictions["true_class"].to_numpy() == name,
                   predictions[inference.probability_column(name)].to_numpy(np.float64)) for name in class_names}


def chosen_images(predictions: pd.DataFrame, class_names: Sequence[str], per_group: int) -> pd.DataFrame:
    """Per true class, the ``per_group`` correct and the ``per_group`` wrong predictions the model was surest of.

    Adds ``outcome`` (correct, wrong) and ``confidence`` (the predicted class's probability); ties are
    broken by file, so the choice is the same on every run.
    """
    probabilities = predictions[_probability_columns(class_names)].to_numpy(np.float64)
    predicted = predictions["predicted_class"].map({name: i for i, name in enumerate(class_names)})
    if predicted.isna().any():
        raise rundir.RunError(f"predictions name a class outside {list(class_names)}.")
    frame = predictions.assign(
        confidence=probabilities[np.arange(len(predictions)), predicted.to_numpy(np.int64)],
        outcome=np.where(predictions["true_class"] == predictions["predicted_class"], "correct", "wrong"))
    frame = frame.sort_values(["confidence", "file"], ascending=[False, True], kind="stable")
    return frame.groupby(["true_class", "outcome"], sort=False).head(per_group)


def _gradcam(run_dir: str, per_group: int, overlay_size: int) -> str:
    title = "Grad-CAM of validation and test images"
    if per_group == 0:
        return _section(title, _absent("No Grad-CAM overlays: none were asked for."))
    splits = [split for split in GRADCAM_SPLITS if _has_predictions(run_dir, split)]
    if not splits:
        return _section(title, _absent(f"No Grad-CAM overlays: the run has no {rundir.predictions_of_split('val')} "
                                       f"or {rundir.predictions_of_split('test')} (xray-evaluate writes them)."))
    model_path = os.path.join(run_dir, rundir.MODEL)
    if not os.path.isfile(model_path):
        return _section(title, _absent(f"No Grad-CAM overlays: the run has no {rundir.MODEL}."))
    cam = gradcam.GradCam(models.load_model(model_path))
    class_names = rundir.read_classes(run_dir)
    parts = [f"<p>Per true class, the {per_group} correct and the {per_group} wrong images the model was surest "
             "of, each under the heatmap of its predicted class (red: what raised that class's score most).</p>"]
    for split in splits:
        predictions = rundir.read_predictions(run_dir, split, _probability_columns(class_names))
        chosen = chosen_images(predictions, class_names, per_group)
        pictures = _overlays(cam, chosen, class_names, overlay_size)
        parts.append(f"<h3>{_e(split)}</h3>")
        for true_class in class_names:
            cells, missing = [], []
            for outcome in ("correct", "wrong"):
                rows = chosen[(chosen["true_class"] == true_class) & (chosen["outcome"] == outcome)]
                cells += [_cam_cell(row, pictures[row.Index]) for row in rows.itertuples()]
                missing += [] if len(rows) else [f"No {outcome} prediction of a {true_class} image."]
            notes = _absent(" ".join(missing)) if missing else ""
            parts.append(f'<h4>{_e(true_class)}</h4>{notes}<div class="cams">' + "".join(cells) + "</div>")
    return _section(title, *parts)


def _overlays(cam: gradcam.GradCam, chosen: pd.DataFrame, class_names: Sequence[str],
              overlay_size: int) -> dict[object, bytes | str]:
    """Row index -> PNG of the row's annotated overlay, or why its image cannot be read.

    The heatmap comes from the image decoded at the model's size, as the model saw it; the picture
    under it is the image decoded again at ``overlay_size``, so small models still give legible pictures.
    """
    pictures, readable = {}, []
    for row in chosen.itertuples():
        image, problem = predict.decode_file(str(row.file), cam.image_size[0])
        if image is None:
            pictures[row.Index] = problem
        else:
            readable.append((row, image))
    for start in range(0, len(readable), _GRADCAM_BATCH):
        batch = readable[start:start + _GRADCAM_BATCH]
        explained = np.array([list(class_names).index(row.predicted_class) for row, _ in batch])
        heatmaps = cam.heatmaps(np.stack([image for _, image in batch]), explained)
        for (row, _), heatmap in zip(batch, heatmaps):
            display = predict.decode_file(str(row.file), overlay_size)[0]
            picture = gradcam.annotated_overlay(display[..., 0], heatmap, row.predicted_class, row.confidence)
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, format="PNG")
            pictures[row.Index] = buffer.getvalue()
    return pictures


def _cam_cell(row, picture: bytes | str) -> str:
    """One overlay, framed green when correct and red when wrong, with the true class and the file."""
    caption = f"{row.outcome}: true {row.true_class}; {os.path.basename(str(row.file))}"
    if isinstance(picture, str):
        unreadable = f"{caption}: cannot be read ({picture})"
        return f'<figure class="{row.outcome}"><figcaption>{_e(unreadable)}</figcaption></figure>'
    image = _image(picture, f"Grad-CAM, {caption}")
    return f'<figure class="{row.outcome}">{image}<figcaption>{_e(caption)}</figcaption></figure>'
