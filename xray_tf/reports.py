"""The paper's Table 1 built from run directories (read through ``rundir``).

Only pandas and NumPy, no TensorFlow, so tables are quick: they need nothing but ``history.csv``,
``flags.txt`` and ``metrics*.json``.

Two kinds of accuracy are reported and never mixed up:

* the accuracy of the model a run keeps (lowest ``val_loss``), measured once on each split after
  training (``metrics.json``, or ``metrics_<split>.json`` written later by ``xray-evaluate``);
* the paper's own metric, the *average accuracy over epochs*: the mean of the per-epoch accuracies
  in ``history.csv``. It mixes early, poor epochs with later ones, so it is not the accuracy of any
  model; it is reported only so that our runs can be set beside the published numbers.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from xray_tf import rundir

# Experiment names (--experiment=<name>, flags/<name>.cfg) of the paper's six Table 1 experiments, in the paper's order.
PAPER_EXPERIMENTS = {
    "prce": "PRCE: ImageNet ResNet50, cross-entropy",
    "prcw": "PRCW: ImageNet ResNet50, class-weighted cross-entropy",
    "prfl": "PRFL: ImageNet ResNet50, focal loss",
    "pdcxce": "PDCXCE: CheXNet DenseNet121, cross-entropy",
    "pdcxfl": "PDCXFL: CheXNet DenseNet121, focal loss",
    "rce": "RCE: ResNet50 from scratch, cross-entropy",
}
EXTRA_SUFFIX = "_extra"  # run_paper's name for an experiment repeated with --extra_data (Table 2)

# Published train / val / test accuracies (%), Table 1 of Bolhassani, "Transfer learning approach to
# classify the X-ray image that corresponds to corona disease using ResNet50 pre-trained by ChexNet",
# J. Intelligent Learning Systems and Applications 16(2), 80-90, 2024 (doi:10.4236/jilsa.2024.162006;
# arXiv:2105.08382). They are the paper's metric, the mean over epochs of each epoch's accuracy (its
# section 2.5). Its Table 2 (extra COVID-19 samples, ``<name>_extra``) prints the very same numbers,
# so they are repeated there as printed.
_TABLE_1 = {
    "prce": (81.06, 65.39, 62.1),
    "prcw": (86.06, 73.43, 80.2),
    "prfl": (85.84, 75.0, 75.5),
    "pdcxce": (85.28, 76.062, 80.0),
    "pdcxfl": (87.95, 73.87, 75.56),
    "rce": (81.608, 69.93, 71.11),
}
PUBLISHED_ACCURACY: dict[str, tuple[float, float, float]] = {
    **_TABLE_1, **{name + EXTRA_SUFFIX: accuracies for name, accuracies in _TABLE_1.items()},
}
NOT_FOUND = "n/a (not in the paper)"

# Settings that may differ between runs of one experiment: the seed is what is being averaged over;
# the others name or continue a run without changing what it trains.
_PER_RUN_SETTINGS = frozenset({"seed", "run_name", "output_dir", "resume"})

# Table columns: key, Markdown header. Accuracies are of the kept model; "avg over epochs" is the paper's metric.
# A key ``<split>_<metric>`` has a bootstrap interval where the split's report has one for ``<metric>``.
TABLE_METRICS = (
    ("train_accuracy", "Tr acc"),
    ("val_accuracy", "Val acc"),
    ("test_accuracy", "Tst acc"),
    ("val_balanced_accuracy", "Val bal. acc"),
    ("val_macro_f1", "Val macro F1"),
    ("test_balanced_accuracy", "Tst bal. acc"),
    ("test_macro_f1", "Tst macro F1"),
    ("train_avg_accuracy_over_epochs", "Tr avg acc over epochs (paper's metric)"),
    ("val_avg_accuracy_over_epochs", "Val avg acc over epochs (paper's metric)"),
)


def average_accuracy_over_epochs(history: pd.DataFrame) -> dict[str, float | int]:
    """The paper's metric: the mean of the per-epoch train and validation accuracies."""
    return {
        "train": float(history["accuracy"].mean()),
        "val": float(history["val_accuracy"].mean()),
        "epochs": len(history),
    }


def experiment_name(run_dir: str) -> str:
    """``.../prce_seed3`` -> ``prce``: the run name without its seed and duplicate-name suffixes."""
    name = os.path.basename(os.path.normpath(run_dir))
    name = re.sub(r"-\d+$", "", name)
    return re.sub(r"_seed\d+$", "", name)


def run_row(run_dir: str) -> dict:
    """One run as a flat row: experiment, seed, every ``TABLE_METRICS`` value (None when undefined)."""
    config = rundir.read_config(run_dir)
    reports = rundir.split_reports(run_dir)
    paper_metric = average_accuracy_over_epochs(rundir.read_history(run_dir))
    row = {
        "experiment": experiment_name(run_dir),
        "run_dir": os.path.abspath(run_dir),
        "seed": config.seed,
        "extra_data": bool(config.extra_data),
        "epochs": paper_metric["epochs"],
    }
    for split in ("train", "val", "test"):
        report, source = reports.get(split, ({}, None))
        intervals = report.get("ci95") or {}  # absent from runs made before intervals existed
        for metric in ("accuracy",) if split == "train" else ("accuracy", "balanced_accuracy", "macro_f1"):
            row[f"{split}_{metric}"] = report.get(metric)
            low, high = intervals.get(metric) or (None, None)
            row[f"{split}_{metric}_ci95_low"], row[f"{split}_{metric}_ci95_high"] = low, high
        if split != "train":
            row[f"{split}_source"] = source
    row["train_avg_accuracy_over_epochs"] = paper_metric["train"]
    row["val_avg_accuracy_over_epochs"] = paper_metric["val"]
    return row


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample standard deviation, n)`` of the defined values; std is None for fewer than two."""
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if len(defined) == 0:
        return None, None, 0
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
    return float(np.mean(defined)), std, len(defined)


def _settings(run_dir: str) -> dict[str, object]:
    settings = dataclasses.asdict(rundir.read_config(run_dir))
    return {name: value for name, value in settings.items() if name not in _PER_RUN_SETTINGS}


def _check_group(experiment: str, run_dirs: list[str], seeds: list[int | None]) -> None:
    """Refuse to average runs that are not repeats of one experiment with different seeds."""
    reference = _settings(run_dirs[0])
    for run_dir in run_dirs[1:]:
        settings = _settings(run_dir)
        differing = sorted(k for k in reference.keys() | settings.keys() if reference.get(k) != settings.get(k))
        if differing:
            raise rundir.RunError(
                f"Runs {run_dirs[0]} and {run_dir} are both named {experiment!r} but differ in "
                f"{', '.join('--' + k for k in differing)}; only the seed may differ between repeats."
            )
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
        raise rundir.RunError(f"Experiment {experiment!r} has several runs with seed {repeated[0]}: "
                              f"{', '.join(run_dirs)}.")


def _sort_key(experiment: str) -> tuple:
    base = experiment.removesuffix(EXTRA_SUFFIX)
    order = list(PAPER_EXPERIMENTS)
    return (experiment != base, order.index(base) if base in order else len(order), experiment)


def summarise(run_dirs: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, table)``: one row per run, and per experiment the mean, std and n of every metric."""
    runs = pd.DataFrame([run_row(run_dir) for run_dir in run_dirs])
    table_rows = []
    for experiment in sorted(runs["experiment"].unique(), key=_sort_key):
        group = runs[runs["experiment"] == experiment]
        seeds = [None if pd.isna(s) else int(s) for s in group["seed"]]
        _check_group(experiment, list(group["run_dir"]), seeds)
        row = {
            "experiment": experiment,
            "runs": len(group),
            "seeds": " ".join(str(s) for s in sorted(s for s in seeds if s is not None)),
        }
        for key, _ in TABLE_METRICS:
            values = [None if pd.isna(v) else float(v) for v in group[key]]
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = mean_std(values)
            bounds = [f"{key}_ci95_low", f"{key}_ci95_high"]
            if bounds[0] in group:  # one run: its own interval says how sure it is; several: their spread does
                row[bounds[0]], row[bounds[1]] = group.iloc[0][bounds] if len(group) == 1 else (None, None)
        published = PUBLISHED_ACCURACY.get(experiment)
        for split, value in zip(("train", "val", "test"), published or (None, None, None)):
            row[f"published_{split}_accuracy"] = value
        table_rows.append(row)
    return runs, pd.DataFrame(table_rows)


def format_mean_std(mean: float | None, std: float | None, n: int, runs: int, scale: float = 100.0) -> str:
    """``"90.0 ± 10.0"`` (percent); ``"n/a"`` when undefined; ``(n=k)`` when some runs lack the value."""
    if mean is None or pd.isna(mean):
        return "n/a"
    text = f"{scale * mean:.1f}" if std is None or pd.isna(std) else f"{scale * mean:.1f} ± {scale * std:.1f}"
    return text if n == runs else f"{text} (n={n})"


def format_interval(low: float | None, high: float | None, scale: float = 100.0) -> str:
    """``" [58.0, 66.2]"`` (percent), or ``""`` when there is no interval."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f" [{scale * low:.1f}, {scale * high:.1f}]"


def _display_name(experiment: str) -> str:
    base = experiment.removesuffix(EXTRA_SUFFIX)
    name = base.upper() if base in PAPER_EXPERIMENTS else base
    return name + (" + extra COVID-19" if experiment != base else "")


def markdown_table(table: pd.DataFrame) -> str:
    """The table in Markdown, percentages with mean ± sample std over seeds, and a legend."""
    headers = ["Experiment", "Seeds", *(header for _, header in TABLE_METRICS), "Published Tr / Val / Tst acc"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table.to_dict("records"):
        cells = [_display_name(row["experiment"]), row["seeds"] or "?"]
        cells += [
            format_mean_std(row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"], row["runs"])
            + format_interval(row.get(f"{key}_ci95_low"), row.get(f"{key}_ci95_high"))
            for key, _ in TABLE_METRICS
        ]
        published = [row[f"published_{split}_accuracy"] for split in ("train", "val", "test")]
        cells.append(NOT_FOUND if any(v is None or pd.isna(v) for v in published)
                     else " / ".join(f"{v}" for v in published))  # as printed: 76.062, 80.0
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    legend = [
        "",
        "Percent; mean ± sample standard deviation (n - 1) over the seeds listed; for an experiment of one "
        "run, [low, high] is that run's 95 % bootstrap interval (ci95 of its metrics file: resampled by "
        "class, and by patient where known); n/a: the split or value "
        "does not exist (e.g. no TEST split). Tr / Val / Tst acc, bal. acc (mean per-class recall) and "
        "macro F1 are of the model each run kept (lowest validation loss), measured after training. "
        "'Avg acc over epochs' is the paper's metric: the mean of the per-epoch accuracies in history.csv "
        "(train: augmented, class-balanced batches during the epoch), not the accuracy of any one model. "
        "Published: Table 1 of Bolhassani, JILSA 16(2):80-90, 2024 (doi:10.4236/jilsa.2024.162006; "
        "arXiv:2105.08382), the paper's metric (mean accuracy over epochs), to be set beside ours of the same "
        "name; its Table 2 (+ extra COVID-19) prints the same numbers.",
    ]
    return "\n".join(lines + legend) + "\n"
