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

# Published train / val / test accuracies (%) of Bolhassani, "Transfer learning approach to classify
# the X-ray image that corresponds to corona disease using ResNet50 pretrained by ChexNet"
# (arXiv:2105.08382; J. Intelligent Learning Systems and Applications 16(2), 80-90, 2024), keyed by
# experiment (``<name>_extra``: Table 2). The numbers could not be found in any source available when
# this was written, so every entry is None and shows as "n/a (not found)". Fill them in from the
# paper itself, never from memory or another reproduction.
PUBLISHED_ACCURACY: dict[str, tuple[float, float, float] | None] = {
    **{name: None for name in PAPER_EXPERIMENTS},
    **{name + EXTRA_SUFFIX: None for name in PAPER_EXPERIMENTS},
}
NOT_FOUND = "n/a (not found)"

# Settings that may differ between runs of one experiment: the seed is what is being averaged over;
# the others name or continue a run without changing what it trains.
_PER_RUN_SETTINGS = frozenset({"seed", "run_name", "output_dir", "resume"})

# Table columns: key, Markdown header. Accuracies are of the kept model; "avg over epochs" is the paper's metric.
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
        row[f"{split}_accuracy"] = report.get("accuracy")
        if split != "train":
            row[f"{split}_balanced_accuracy"] = report.get("balanced_accuracy")
            row[f"{split}_macro_f1"] = report.get("macro_f1")
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
        raise rundir.RunError(f"Experiment {experiment!r} has several runs with seed {repeated[0]}: {', '.join(run_dirs)}.")


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
            for key, _ in TABLE_METRICS
        ]
        published = [row[f"published_{split}_accuracy"] for split in ("train", "val", "test")]
        cells.append(NOT_FOUND if any(v is None or pd.isna(v) for v in published)
                     else " / ".join(f"{v:.1f}" for v in published))
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    legend = [
        "",
        "Percent; mean ± sample standard deviation (n - 1) over the seeds listed; n/a: the split or value "
        "does not exist (e.g. no TEST split). Tr / Val / Tst acc, bal. acc (mean per-class recall) and "
        "macro F1 are of the model each run kept (lowest validation loss), measured after training. "
        "'Avg acc over epochs' is the paper's metric: the mean of the per-epoch accuracies in history.csv "
        "(train: augmented, class-balanced batches during the epoch), not the accuracy of any one model. "
        "Published: Bolhassani (arXiv:2105.08382; JILSA 2024).",
    ]
    return "\n".join(lines + legend) + "\n"
