"""Training curves from ``history.csv``: the paper's Figures 4-6 and the report's training section.

Kept apart from the other figures (``xray_tf.plots``, whose style, colours and ``save`` they
share) since these also read run directories: a run's loss (``flags.txt``) picks its loss axes,
its kept epoch (``metrics.json``) gets a star, and the balanced accuracy is computed here from
the per-class recalls that training logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from xray_tf import plots, rundir
from xray_tf.config import TrainConfig

# Train and validation curves differ in line and marker, so a single epoch (a point) is still readable.
_TRAIN_STYLE = {"linestyle": "-", "marker": "o", "markersize": 3}
_VALIDATION_STYLE = {"linestyle": "--", "marker": "o", "markersize": 4, "markerfacecolor": "none"}
_KEPT_STYLE = {"linestyle": "none", "marker": "*", "markersize": 10, "markeredgecolor": "black",
               "markeredgewidth": 0.5}  # a star, outlined so that it shows on a curve of its own colour
_RECALL = "recall_"  # training logs recall_<metric_suffix(class)> and val_recall_<...>


def loss_name(config: TrainConfig) -> str:
    """A run's loss as its axes name it: losses with other formulas or weights have other scales."""
    name = "cross-entropy" if config.loss == "ce" else f"focal (γ={config.focal_gamma:g}, α={config.focal_alpha})"
    return f"{name}, balanced class weights" if config.class_weight == "balanced" else name


def _recall_suffixes(history: pd.DataFrame) -> list[str]:
    """The classes (as ``metrics.metric_suffix`` spells them) with a train and a validation recall column."""
    return [column[len(_RECALL):] for column in history.columns
            if column.startswith(_RECALL) and f"val_{column}" in history.columns]


def with_balanced_accuracy(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` plus ``balanced_accuracy`` and ``val_balanced_accuracy``: each epoch's mean per-class recall.

    NaN for a run that logged no per-class recall. A class absent from validation logs a recall of
    0, which the mean then counts.
    """
    suffixes = _recall_suffixes(history)
    columns = {}
    for prefix in ("", "val_"):
        recalls = history[[f"{prefix}{_RECALL}{suffix}" for suffix in suffixes]]
        columns[f"{prefix}balanced_accuracy"] = recalls.mean(axis=1) if suffixes else np.nan
    return history.assign(**columns)


def _draw_run(axes, history: pd.DataFrame, column: str, scale: float, colour, kept_epoch: int | None) -> None:
    """Train and validation curves of one quantity, and a star on validation at the kept epoch."""
    if column not in history or history[column].isna().all():
        return
    axes.plot(history["epoch"], scale * history[column], color=colour, **_TRAIN_STYLE)
    axes.plot(history["epoch"], scale * history[f"val_{column}"], color=colour, **_VALIDATION_STYLE)
    kept = history[history["epoch"] == kept_epoch]
    if not kept.empty:
        axes.plot(kept["epoch"], scale * kept[f"val_{column}"], color=colour, **_KEPT_STYLE)


def history_figure(
    histories: Mapping[str, pd.DataFrame],
    title: str | None = None,
    kept_epochs: Mapping[str, int | None] | None = None,
    losses: Mapping[str, str] | None = None,
) -> Figure:
    """Training curves against epoch: train solid, validation dashed, one colour per run.

    ``histories`` maps the legend name of a run to its ``history.csv`` (columns epoch, accuracy,
    val_accuracy, loss, val_loss, and optionally ``recall_<class>``/``val_recall_<class>``). Top
    row: accuracy; balanced accuracy (where recalls were logged); one loss axes per distinct
    ``losses`` name (run -> ``loss_name``), since different losses have incomparable scales.
    Bottom row, where recalls were logged: one recall axes per class. ``kept_epochs`` (run -> the
    epoch whose model was kept) puts a star on each validation curve at that epoch.
    """
    histories = {name: with_balanced_accuracy(history) for name, history in histories.items()}
    kept_epochs, losses = kept_epochs or {}, losses or {}
    colours = dict(zip(histories, plots.distinct_colours(len(histories))))
    suffixes = list(dict.fromkeys(s for history in histories.values() for s in _recall_suffixes(history)))
    loss_groups: dict[str, list[str]] = {}
    for name in histories:
        loss_groups.setdefault(losses.get(name, ""), []).append(name)
    top = [("accuracy", "Accuracy", list(histories))]
    if suffixes:
        top.append(("balanced_accuracy", "Balanced accuracy", list(histories)))
    top += [("loss", f"Loss: {label}" if label else "Loss", runs) for label, runs in loss_groups.items()]
    bottom = [(f"{_RECALL}{suffix}", f"Recall: {suffix}", list(histories)) for suffix in suffixes]
    columns = max(len(top), len(bottom))
    last_epoch = max(int(history["epoch"].max()) for history in histories.values()) if histories else 1
    with matplotlib.rc_context(plots.STYLE):
        figure = Figure(figsize=(max(7.0, 2.3 * columns), 2.8 if not bottom else 5.4), layout="constrained")
        grid = figure.add_gridspec(2 if bottom else 1, columns)
        for row, panels in enumerate((top, bottom)):
            for position, (column, panel_title, runs) in enumerate(panels):
                axes = figure.add_subplot(grid[row, position])
                scale = 1 if column == "loss" else 100
                for name in runs:
                    _draw_run(axes, histories[name], column, scale, colours[name], kept_epochs.get(name))
                axes.set_title(panel_title)
                axes.set_ylabel("Loss" if column == "loss" else "%")
                axes.set_xlabel("Epoch")
                axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
                axes.set_xlim(0.5, last_epoch + 0.5)
                axes.grid(alpha=0.3)
        handles = [Line2D([], [], color=c, linewidth=2) for c in colours.values()]
        handles += [Line2D([], [], color="0.3", **_TRAIN_STYLE), Line2D([], [], color="0.3", **_VALIDATION_STYLE)]
        labels = [*histories, "train", "validation"]
        if any(kept_epochs.get(name) is not None for name in histories):
            handles.append(Line2D([], [], color="0.3", **_KEPT_STYLE))
            labels.append("kept epoch")
        figure.legend(handles, labels, loc="outside right center", frameon=False)
        if title:
            figure.suptitle(title)
    return figure


def run_histories_figure(run_dirs: Mapping[str, str], title: str | None = None) -> Figure:
    """``history_figure`` of run directories (legend name -> directory), with each run's kept epoch and loss.

    The kept epoch is ``metrics.json``'s ``model_selection.best_epoch`` (none while unfinished), the
    loss is ``flags.txt``'s (one shared loss axes for runs without one).
    """
    histories, kept_epochs, losses = {}, {}, {}
    for name, run_dir in run_dirs.items():
        histories[name] = rundir.read_history(run_dir)
        if rundir.is_finished(run_dir):
            kept_epochs[name] = (rundir.read_metrics(run_dir).get("model_selection") or {}).get("best_epoch")
        if os.path.isfile(os.path.join(run_dir, rundir.FLAGS)):
            losses[name] = loss_name(rundir.read_config(run_dir))
    return history_figure(histories, title, kept_epochs, losses)
