"""Figures for the paper's experiments, built with matplotlib's object API and saved as PNG.

Figures are ``matplotlib.figure.Figure`` objects created without pyplot, so no interactive backend
and no global figure state are involved (this works on a headless server and in tests, and a
library import never switches the caller's backend). Every function returns its Figure, so tests
can count axes and lines; ``save`` writes it at a resolution fit for print.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import StrMethodFormatter

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


def distinct_colours(count: int) -> list:
    """Distinct colours: the 10 of ``tab10``, or evenly spaced ``viridis`` ones for more."""
    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    return [matplotlib.colormaps["viridis"](x) for x in np.linspace(0, 0.95, count)]


def png_bytes(figure: Figure, dpi: int = DPI) -> bytes:
    """``figure`` encoded as PNG, cropped to its content: for a file, or inline in a web page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png", bbox_inches="tight")
    return buffer.getvalue()


def save(figure: Figure, path: str) -> str:
    """Write ``figure`` as PNG at ``DPI``, atomically (``rundir.write_bytes``); return ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rundir.write_bytes(path, png_bytes(figure))
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
    colours = distinct_colours(len(curves))
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
        _unit_square(axes, handles, labels, "lower right", "False positive rate (1 − specificity)",
                     "True positive rate (sensitivity)", title)
    return figure


def pr_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float] | None], title: str) -> Figure:
    """One-vs-rest precision-recall curve per class with its average precision (AP).

    ``curves`` maps class -> ``metrics.precision_recall_curve`` output ``(recall, precision, AP)``,
    None when undefined. Beside the ROC it shows what a rare class's ROC hides: how many of the images
    called that class are that class. One axes, one line per defined curve; a class without a curve
    is named in the legend as undefined.
    """
    colours = distinct_colours(len(curves))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(4.2, 4.0), layout="constrained")
        axes = figure.subplots()
        handles, labels = [], []
        for colour, (name, curve) in zip(colours, curves.items()):
            if curve is None:
                handles.append(Line2D([], [], linestyle="none"))
                labels.append(f"{name}: undefined")
                continue
            recall, precision, average_precision = curve
            (line,) = axes.plot(recall, precision, color=colour, linewidth=1.6)
            handles.append(line)
            labels.append(f"{name} (AP {average_precision:.3f})")
        _unit_square(axes, handles, labels, "lower left", "Recall (sensitivity)",
                     "Precision (positive predictive value)", title)
    return figure


def _unit_square(axes, handles: list, labels: list[str], legend_at: str, x_label: str, y_label: str,
                 title: str) -> None:
    """Legend, labels and the square [0, 1] axes that ROC and PR curves share."""
    axes.legend(handles, labels, loc=legend_at, framealpha=0.9, edgecolor="none")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)


_LOG_FLOOR = 0.7  # where a log axis of counts starts: a bar of 1 image still shows, an empty one is flat


def class_counts_figure(counts: Mapping[str, Mapping[str, int]], title: str | None = None) -> Figure:
    """Figure 1: images per class in each split (left) and each split's class distribution (right).

    Two axes of grouped bars, each bar labelled with its value; ``counts`` maps split -> class ->
    number of images. The counts' axis is logarithmic, so that a class with 5 images (COVID-19 in
    validation) is a visible bar beside one with 2,000; an empty class is a label "0" on the axis.
    """
    splits = [split for split, per_class in counts.items() if sum(per_class.values()) > 0]
    class_names = list(next(iter(counts.values())))
    colours = distinct_colours(len(splits))
    width = 0.8 / len(splits)
    positions = np.arange(len(class_names))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(7.0, 3.0), layout="constrained")
        count_axes, share_axes = figure.subplots(1, 2)
        for s, (split, colour) in enumerate(zip(splits, colours)):
            values = np.array([counts[split][name] for name in class_names])
            offset = positions + (s - (len(splits) - 1) / 2) * width
            total = values.sum()
            bars = count_axes.bar(offset, np.maximum(values, _LOG_FLOOR), width, color=colour,
                                  label=f"{split} ({total} images)")
            count_axes.bar_label(bars, [str(v) for v in values], fontsize=6, padding=2, rotation=90)
            share = share_axes.bar(offset, 100.0 * values / total, width, color=colour, label=split)
            share_axes.bar_label(share, fmt="%.1f", fontsize=6, padding=2, rotation=90)
        for axes, label, panel in ((count_axes, "Images (log scale)", "(a) Images per class"),
                                   (share_axes, "Share of the split (%)", "(b) Class distribution")):
            axes.set_xticks(positions, class_names)
            axes.set_xlabel("Class")
            axes.set_ylabel(label)
            axes.set_title(panel)
            axes.legend(frameon=False)
        count_axes.set_yscale("log")
        highest = max((max(counts[split].values()) for split in splits), default=1)
        count_axes.set_ylim(_LOG_FLOOR, highest * 40)  # room above the tallest bar for its label and the legend
        count_axes.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        share_axes.margins(y=0.2)
        if title:
            figure.suptitle(title)
    return figure


BLACK_BORDER = 4  # grey levels 0-3: 3-8 % of each CoronaHack class's pixels (40 images each), mostly borders


def samples_and_intensities_figure(
    samples: Mapping[str, Sequence[np.ndarray]],
    histograms: Mapping[str, np.ndarray],
    images_per_class: Mapping[str, int],
    title: str | None = None,
) -> Figure:
    """Figure 2: sample images of each class (one column per class) above per-class intensity histograms.

    ``samples`` maps class -> grey uint8 images ``[H, W]`` (the same number for every class);
    ``histograms`` maps class -> the share of pixels at each of the 256 grey levels. Axes: one per
    sample image plus the histogram axes, which has one line per class. The histograms leave out the
    ``BLACK_BORDER`` darkest levels, the black borders around many scans: their spike would
    dwarf the rest and press every class's curve into the same flat line. The legend gives each
    class's share of such pixels, and the histograms are shares of the other pixels.
    """
    class_names = list(samples)
    rows = max(len(images) for images in samples.values())
    colours = distinct_colours(len(class_names))
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
        levels = np.arange(BLACK_BORDER, 256)
        for colour, name in zip(colours, class_names):
            shares = np.asarray(histograms[name], dtype=np.float64)
            border = shares[:BLACK_BORDER].sum()
            rest = shares[BLACK_BORDER:] / max(1.0 - border, 1e-12)
            histogram_axes.plot(levels, 100.0 * rest, color=colour, linewidth=1.2,
                                label=f"{name} ({images_per_class[name]} images; {100 * border:.1f}% border)")
        histogram_axes.set_xlim(BLACK_BORDER, 255)
        histogram_axes.set_xlabel(f"Pixel intensity (grey level; 0-{BLACK_BORDER - 1}, the black border, left out)")
        histogram_axes.set_ylabel("Share of the other pixels (%)")
        histogram_axes.legend(frameon=False, ncols=2)
        histogram_axes.grid(alpha=0.3)
        if title:
            figure.suptitle(title)
    return figure


def reliability_figure(reliability: Mapping[str, Sequence], title: str) -> Figure:
    """Reliability diagram: each confidence bin's accuracy against perfect calibration, and its image count.

    ``reliability`` is ``calibration.reliability``'s result (``edges``, ``count``, ``confidence``,
    ``accuracy`` per bin, None where empty, and ``ece``). Two axes: above, one bar per non-empty bin
    at its accuracy, a marker at its mean confidence and the diagonal; below, the images per bin, so
    a bin of three images is not read like one of three thousand.
    """
    edges = 100.0 * np.asarray(reliability["edges"], dtype=np.float64)
    centres, widths = (edges[:-1] + edges[1:]) / 2.0, np.diff(edges)
    filled = np.array([value is not None for value in reliability["accuracy"]])
    accuracy = 100.0 * np.array([value for value in reliability["accuracy"] if value is not None], dtype=np.float64)
    confidence = 100.0 * np.array([value for value in reliability["confidence"] if value is not None],
                                  dtype=np.float64)
    colour = distinct_colours(1)[0]
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.5, 4.2), layout="constrained")
        accuracy_axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        accuracy_axes.bar(centres[filled], accuracy, widths[filled], color=colour, alpha=0.75, edgecolor="white",
                          label="Accuracy of the bin")
        accuracy_axes.plot(confidence, accuracy, linestyle="none", marker="o", markersize=3, color="black",
                           label="Mean confidence of the bin")
        accuracy_axes.plot([0, 100], [0, 100], color="0.5", linestyle=":", linewidth=1, label="Perfect calibration")
        accuracy_axes.set_xlim(0, 100)
        accuracy_axes.set_ylim(0, 100)
        accuracy_axes.set_ylabel("Accuracy (%)")
        accuracy_axes.legend(loc="upper left", frameon=False)
        accuracy_axes.set_title(f"{title}\nECE {100 * reliability['ece']:.1f}% ({len(centres)} bins)")
        count_axes.bar(centres, reliability["count"], widths, color="0.6", edgecolor="white")
        count_axes.set_xlabel("Confidence: the predicted class's probability (%)")
        count_axes.set_ylabel("Images")
    return figure
