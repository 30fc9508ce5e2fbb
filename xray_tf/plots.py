"""Figures for the paper's experiments, built with matplotlib's object API and saved as PNG.

Figures are ``matplotlib.figure.Figure`` objects created without pyplot, so no interactive backend
and no global figure state are involved (this works on a headless server and in tests, and a
library import never switches the caller's backend). Every function returns its Figure, so tests
can count axes and lines; ``save`` writes it at a resolution fit for print.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from xray_tf import rundir

DPI = 300  # print resolution; figures are sized in inches for one (3.5") or two (7") journal columns
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


# Train and validation curves differ in line and marker, so a single epoch (a point) is still readable.
_TRAIN_STYLE = {"linestyle": "-", "marker": "o", "markersize": 3}
_VALIDATION_STYLE = {"linestyle": "--", "marker": "o", "markersize": 4, "markerfacecolor": "none"}


def _colours(count: int) -> list:
    """Distinct colours: the 10 of ``tab10``, or evenly spaced ``viridis`` ones for more."""
    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    return [matplotlib.colormaps["viridis"](x) for x in np.linspace(0, 0.95, count)]


def save(figure: Figure, path: str) -> str:
    """Write ``figure`` as PNG at ``DPI``, atomically (``rundir.write_atomic``); return ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rundir.write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=DPI, format="png",
                                                               bbox_inches="tight"))
    return path


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Counts with the share of each true class; colour = that share, so a rare class is as visible.

    Two axes: the matrix and its colour bar. A class absent from the split has an empty (grey) row.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = np.full(matrix.shape, np.nan)
    np.divide(100.0 * matrix, row_totals, out=shares, where=row_totals > 0)
    k = len(class_names)
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(1.2 * k + 1.6, 1.1 * k + 1.0), layout="constrained")
        axes = figure.subplots()
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
        image = axes.imshow(np.ma.masked_invalid(shares), cmap=cmap, vmin=0, vmax=100)
        for (i, j), count in np.ndenumerate(matrix):
            share = "n/a" if np.isnan(shares[i, j]) else f"{shares[i, j]:.0f}%"
            dark = not np.isnan(shares[i, j]) and shares[i, j] > 60
            axes.text(j, i, f"{count}\n({share})", ha="center", va="center", color="white" if dark else "black")
        axes.set_xticks(range(k), class_names, rotation=30, ha="right")
        axes.set_yticks(range(k), [f"{name} (n={int(n)})" for name, n in zip(class_names, row_totals[:, 0])])
        axes.set_xlabel("Predicted class")
        axes.set_ylabel("True class (images)")
        axes.set_title(title)
        axes.spines[:].set_visible(False)
        figure.colorbar(image, ax=axes, label="Share of the true class (%)", shrink=0.85)
    return figure


def roc_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray] | None], per_class: Mapping[str, dict], title: str
) -> Figure:
    """One-vs-rest ROC curve per class with its AUC, and the chance diagonal.

    ``curves`` maps class -> ``metrics.roc_curve`` output (None when undefined); ``per_class`` is the
    classification report's, for each class's ``roc_auc`` and ``support``. One axes; one line per
    defined curve plus the diagonal. A class without a curve (absent from the split, or the only
    class present) is named in the legend as undefined.
    """
    colours = _colours(len(curves))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(4.2, 4.0), layout="constrained")
        axes = figure.subplots()
        undefined = []
        for colour, (name, curve) in zip(colours, curves.items()):
            if curve is None:
                undefined.append(name)
                continue
            stats = per_class[name]
            axes.plot(*curve, color=colour, linewidth=1.6,
                      label=f"{name} (AUC {stats['roc_auc']:.3f}, n={stats['support']})")
        axes.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1, label="Chance (AUC 0.5)")
        handles, labels = axes.get_legend_handles_labels()
        for name in undefined:  # a legend entry without a line on the axes
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(f"{name}: undefined (n={per_class[name]['support']})")
        axes.legend(handles, labels, loc="lower right", framealpha=0.9, edgecolor="none")
        axes.set_xlim(-0.01, 1.01)
        axes.set_ylim(-0.01, 1.01)
        axes.set_aspect("equal")
        axes.set_xlabel("False positive rate (1 − specificity)")
        axes.set_ylabel("True positive rate (sensitivity)")
        axes.set_title(title)
    return figure


def history_figure(histories: Mapping[str, pd.DataFrame], title: str | None = None) -> Figure:
    """Accuracy and loss against epoch: train solid, validation dashed, one colour per run.

    Two axes (accuracy, loss), each with two lines per run. ``histories`` maps the legend name of a
    run to its ``history.csv`` (columns epoch, accuracy, val_accuracy, loss, val_loss).
    """
    colours = _colours(len(histories))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(7.0, 3.2), layout="constrained")
        accuracy_axes, loss_axes = figure.subplots(1, 2)
        for colour, history in zip(colours, histories.values()):
            epochs = history["epoch"]
            for axes, column, scale in ((accuracy_axes, "accuracy", 100), (loss_axes, "loss", 1)):
                axes.plot(epochs, scale * history[column], color=colour, **_TRAIN_STYLE)
                axes.plot(epochs, scale * history[f"val_{column}"], color=colour, **_VALIDATION_STYLE)
        last_epoch = max(int(history["epoch"].max()) for history in histories.values()) if histories else 1
        accuracy_axes.set_ylabel("Accuracy (%)")
        loss_axes.set_ylabel("Loss (each run's own loss function)")
        for axes in (accuracy_axes, loss_axes):
            axes.set_xlabel("Epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            axes.set_xlim(0.5, last_epoch + 0.5)
            axes.grid(alpha=0.3)
        run_handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
        style_handles = [Line2D([], [], color="0.3", **_TRAIN_STYLE), Line2D([], [], color="0.3", **_VALIDATION_STYLE)]
        figure.legend(run_handles + style_handles, [*histories, "train", "validation"],
                      loc="outside right center", frameon=False)
        if title:
            figure.suptitle(title)
    return figure


def class_counts_figure(counts: Mapping[str, Mapping[str, int]], title: str | None = None) -> Figure:
    """Figure 1: images per class in each split (left) and each split's class distribution (right).

    Two axes of grouped bars; ``counts`` maps split -> class -> number of images.
    """
    splits = [split for split, per_class in counts.items() if sum(per_class.values()) > 0]
    class_names = list(next(iter(counts.values())))
    colours = _colours(len(splits))
    width = 0.8 / len(splits)
    positions = np.arange(len(class_names))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(7.0, 3.0), layout="constrained")
        count_axes, share_axes = figure.subplots(1, 2)
        for s, (split, colour) in enumerate(zip(splits, colours)):
            values = np.array([counts[split][name] for name in class_names])
            offset = positions + (s - (len(splits) - 1) / 2) * width
            total = values.sum()
            bars = count_axes.bar(offset, values, width, color=colour, label=f"{split} ({total} images)")
            count_axes.bar_label(bars, fontsize=6, padding=2, rotation=90)
            share = share_axes.bar(offset, 100.0 * values / total, width, color=colour, label=split)
            share_axes.bar_label(share, fmt="%.1f", fontsize=6, padding=2, rotation=90)
        for axes, label, panel in ((count_axes, "Images", "(a) Images per class"),
                                   (share_axes, "Share of the split (%)", "(b) Class distribution")):
            axes.set_xticks(positions, class_names)
            axes.set_xlabel("Class")
            axes.set_ylabel(label)
            axes.set_title(panel)
            axes.margins(y=0.2)
            axes.legend(frameon=False)
        if title:
            figure.suptitle(title)
    return figure


def samples_and_intensities_figure(
    samples: Mapping[str, Sequence[np.ndarray]],
    histograms: Mapping[str, np.ndarray],
    images_per_class: Mapping[str, int],
    title: str | None = None,
) -> Figure:
    """Figure 2: sample images of each class (one column per class) above per-class intensity histograms.

    ``samples`` maps class -> grey uint8 images ``[H, W]`` (the same number for every class);
    ``histograms`` maps class -> the share of pixels at each of the 256 grey levels. Axes: one per
    sample image plus the histogram axes, which has one line per class.
    """
    class_names = list(samples)
    rows = max(len(images) for images in samples.values())
    colours = _colours(len(class_names))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(1.75 * len(class_names), 1.75 * rows + 2.6), layout="constrained")
        grid = figure.add_gridspec(rows + 1, len(class_names), height_ratios=[1.0] * rows + [1.4])
        for c, name in enumerate(class_names):
            for r, image in enumerate(samples[name]):
                axes = figure.add_subplot(grid[r, c])
                axes.imshow(image, cmap="gray", vmin=0, vmax=255)
                axes.set_xticks([])
                axes.set_yticks([])
                if r == 0:
                    axes.set_title(name, color=colours[c])
        histogram_axes = figure.add_subplot(grid[rows, :])
        levels = np.arange(256)
        for colour, name in zip(colours, class_names):
            histogram_axes.plot(levels, 100.0 * histograms[name], color=colour, linewidth=1.2,
                                label=f"{name} ({images_per_class[name]} images)")
        histogram_axes.set_xlim(0, 255)
        histogram_axes.set_xlabel("Pixel intensity (grey level, 0-255)")
        histogram_axes.set_ylabel("Share of pixels (%)")
        histogram_axes.legend(frameon=False, ncols=2)
        histogram_axes.grid(alpha=0.3)
        if title:
            figure.suptitle(title)
    return figure
