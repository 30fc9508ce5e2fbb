"""Comparing two runs on the same images: each metric's difference with a paired bootstrap interval.

``compare_runs`` evaluates both runs' kept models on one split (``xray_tf.evaluate.evaluate_run``,
which also writes each run's ``metrics_<split>.json`` and ``predictions_<split>.csv`` as
``xray-evaluate`` does), reads the two predictions files, pairs their rows by image and reports,
for every metric that ``metrics.classification_report`` gives an interval, A's value, B's, A - B
and the 95 % interval of A - B. The interval is a paired bootstrap: both runs are measured on the
same resample of the images (stratified by class, by patient where the predictions carry a
``patient`` column), so what the two share -- an image hard for both -- cancels out. Accuracy
also gets the exact McNemar test on the images exactly one of them got right.

Runs are only compared when they answer one question on one set of images: the same task and
class list, and the same images. Validation splits drawn with another seed, val fraction or split
method hold other images; the test split (the organizers' TEST rows) is the same for every run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from xray_tf import evaluate, inference, metrics, rundir, statistics

# Settings that decide which TRAIN images the validation split holds.
_VAL_SPLIT_SETTINGS = ("val_fraction", "seed", "split_by")


def check_comparable(run_a: str, run_b: str, split: str) -> None:
    """Raise RunError, naming both runs, unless they share task and classes (and, for val, its split)."""
    config_a, config_b = rundir.read_config(run_a), rundir.read_config(run_b)
    if config_a.task != config_b.task:
        raise rundir.RunError(f"{run_a} was trained for --task={config_a.task} and {run_b} for "
                              f"--task={config_b.task}: their metrics measure different questions.")
    classes_a, classes_b = rundir.read_classes(run_a), rundir.read_classes(run_b)
    if classes_a != classes_b:
        raise rundir.RunError(f"{run_a} has classes {classes_a} and {run_b} has {classes_b} ({rundir.CLASSES}).")
    differing = [f"--{name}={getattr(config_a, name, None)} vs {getattr(config_b, name, None)}"
                 for name in _VAL_SPLIT_SETTINGS if getattr(config_a, name, None) != getattr(config_b, name, None)]
    if split == "val" and differing:
        raise rundir.RunError(f"{run_a} and {run_b} drew their validation splits differently ({', '.join(differing)}), "
                              "so they hold different images; compare on --split=test, or runs sharing their split "
                              "settings.")


def _paired(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> pd.DataFrame:
    """B's rows in A's order, after checking that both hold the same images with the same true classes."""
    files_a, files_b = set(a["file"]), set(b["file"])
    if files_a != files_b:
        only_a, only_b = sorted(files_a - files_b), sorted(files_b - files_a)
        example = only_a[0] if only_a else only_b[0]
        raise rundir.RunError(
            f"{name_a} and {name_b} were evaluated on different images ({len(only_a)} only in the first, "
            f"{len(only_b)} only in the second, e.g. {example}). Validation splits drawn with other seeds or "
            "from other data hold other images: compare on --split=test, or runs sharing their split seed, "
            "with one --data_dir.")
    b = b.set_index("file").loc[a["file"]].reset_index()
    disagreeing = a["file"][a["true_class"].to_numpy() != b["true_class"].to_numpy()]
    if not disagreeing.empty:
        raise rundir.RunError(f"{name_a} and {name_b} give {disagreeing.iloc[0]} different true classes.")
    return b


def compare_predictions(a: pd.DataFrame, b: pd.DataFrame, class_names: Sequence[str], names: Sequence[str] = ("A", "B"),
                        resamples: int = statistics.RESAMPLES, seed: int = 0) -> dict:
    """Every interval metric of A and of B on their shared images, A - B with its paired interval, and McNemar.

    ``a`` and ``b`` are ``rundir.read_predictions`` frames; the prediction is each row's most probable
    class, as in the report. ``names`` name the two in errors.
    """
    b = _paired(a, b, *names)
    unknown = sorted(set(a["true_class"]) - set(class_names))
    if unknown:  # b's are the same, as _paired checked
        raise rundir.RunError(f"{names[0]} and {names[1]}: true class(es) {unknown} are not among the runs' classes "
                              f"{list(class_names)}.")
    y_true = a["true_class"].map(list(class_names).index).to_numpy()
    columns = [inference.probability_column(name) for name in class_names]
    patients = a["patient"] if "patient" in a.columns else b.get("patient")

    probabilities_a, probabilities_b = a[columns].to_numpy(dtype=np.float64), b[columns].to_numpy(dtype=np.float64)
    predicted_a, predicted_b = probabilities_a.argmax(axis=1), probabilities_b.argmax(axis=1)
    statistic_a = functools.partial(metrics.metric_values, y_true=y_true, y_pred=predicted_a, class_names=class_names,
                                    probabilities=probabilities_a)
    statistic_b = functools.partial(metrics.metric_values, y_true=y_true, y_pred=predicted_b, class_names=class_names,
                                    probabilities=probabilities_b)
    differences = statistics.paired_differences(statistic_a, statistic_b, y_true,
                                                None if patients is None else list(patients), resamples, seed)
    everyone = np.ones((1, len(y_true)))
    values_a, values_b = statistic_a(everyone), statistic_b(everyone)
    compared = {}
    for name, resampled in differences.items():
        value_a, value_b = statistics.defined(values_a[name][0]), statistics.defined(values_b[name][0])
        difference = None if value_a is None or value_b is None else value_a - value_b
        compared[name] = {"a": value_a, "b": value_b, "difference": difference,
                          "ci95": statistics.percentile_interval(resampled, difference)}
    correct_a, correct_b = predicted_a == y_true, predicted_b == y_true
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    return {
        "num_images": len(y_true),
        "classes": list(class_names),
        "resampled_by": "patient" if patients is not None else "image",
        "resamples": resamples,
        "seed": seed,
        "metrics": compared,
        "mcnemar": {"only_a_correct": only_a, "only_b_correct": only_b,
                    "p_value": statistics.mcnemar_p_value(only_a, only_b)},
    }


def compare_runs(run_a: str, run_b: str, split: str = "test", data_dir: str | None = None, batch_size: int = 32,
                 *, resamples: int = statistics.RESAMPLES, seed: int = 0) -> dict:
    """Evaluate both runs on ``split`` of ``data_dir`` (default: each run's own data) and compare them."""
    for run in (run_a, run_b):
        if not os.path.isdir(run):
            raise rundir.RunError(f"{run}: not a directory.")
    check_comparable(run_a, run_b, split)
    class_names = rundir.read_classes(run_a)
    columns = [inference.probability_column(name) for name in class_names]
    frames = []
    for run in (run_a, run_b):
        evaluate.evaluate_run(run, split, data_dir, batch_size)
        frames.append(rundir.read_predictions(run, split, columns))
    result = compare_predictions(*frames, class_names, (run_a, run_b), resamples, seed)
    return {"run_a": os.path.abspath(run_a), "run_b": os.path.abspath(run_b), "split": split,
            "data_dir": None if data_dir is None else os.path.abspath(data_dir), **result}


def markdown(result: dict) -> str:
    """The comparison as a Markdown table (percent and percentage points) with its legend."""
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    def points(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:+.1f}"

    split = result.get("split", "the same images")
    lines = [f"A = {result.get('run_a', 'A')}", f"B = {result.get('run_b', 'B')}", "",
             f"{split}: {result['num_images']} images", "",
             "| Metric | A (%) | B (%) | A - B (points) | 95 % CI of A - B |", "|---|---|---|---|---|"]
    for name, row in result["metrics"].items():
        interval = "n/a" if row["ci95"] is None else f"[{points(row['ci95'][0])}, {points(row['ci95'][1])}]"
        lines.append(f"| {name} | {percent(row['a'])} | {percent(row['b'])} | {points(row['difference'])} "
                     f"| {interval} |")
    mcnemar = result["mcnemar"]
    lines += [
        "",
        f"McNemar's exact test (accuracy, two-sided): {mcnemar['only_a_correct']} images only A got right, "
        f"{mcnemar['only_b_correct']} only B; p = {mcnemar['p_value']:.3g}.",
        "",
        f"Intervals: paired bootstrap, {result['resamples']} resamples stratified by class, drawn by "
        f"{result['resampled_by']}, seed {result['seed']}; n/a: undefined (e.g. a class absent from the split). "
        "An interval that excludes 0 says the difference is unlikely to be chance on images like these; "
        "McNemar treats images as independent.",
    ]
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, out_prefix: str) -> tuple[str, str]:
    """Write ``PREFIX.json`` and ``PREFIX.md``; return their paths."""
    json_path, markdown_path = out_prefix + ".json", out_prefix + ".md"
    rundir.write_json(json_path, result)
    rundir.write_text(markdown_path, markdown(result))
    return json_path, markdown_path
