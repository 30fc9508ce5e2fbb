"""The figures (``xray_tf.plots``): their axes, lines and legends, and classes without images.

Figures written by real runs are checked in test_evaluate and test_scripts; training curves in
test_history_plots.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from xray_tf import metrics, plots


def test_pr_figure_draws_each_defined_curve_with_its_average_precision():
    curves = {"a": metrics.precision_recall_curve([True, False, True], [0.9, 0.8, 0.1]), "b": None}
    figure = plots.pr_figure(curves, "pr")
    axes = figure.axes[0]
    assert len(axes.get_lines()) == 1
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == [f"a (AP {curves['a'][2]:.3f})", "b: undefined"]
    np.testing.assert_allclose(axes.get_lines()[0].get_xydata(), np.column_stack(curves["a"][:2]))


def test_class_counts_figure_has_a_log_axis_and_labels_every_bar():
    counts = {"train": {"a": 2000, "b": 50, "c": 5}, "val": {"a": 200, "b": 5, "c": 0},
              "test": {"a": 0, "b": 0, "c": 0}}
    figure = plots.class_counts_figure(counts)
    count_axes, share_axes = figure.axes
    assert len(count_axes.patches) == len(share_axes.patches) == 2 * 3  # two splits with images, three classes
    assert count_axes.get_yscale() == "log" and share_axes.get_yscale() == "linear"
    assert count_axes.get_ylim()[0] < 1  # a bar of one image still shows
    labels = [text.get_text() for text in count_axes.texts]
    assert labels == ["2000", "50", "5", "200", "5", "0"]


def test_intensity_histograms_leave_out_the_black_border():
    rng = np.random.default_rng(0)
    samples = {name: [rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(2)] for name in "abc"}
    histograms = {name: np.full(256, 1 / 256) for name in "abc"}
    histograms["a"] = np.concatenate([[0.5], np.full(255, 0.5 / 255)])  # half the pixels black
    figure = plots.samples_and_intensities_figure(samples, histograms, dict.fromkeys("abc", 2))
    assert len(figure.axes) == 2 * 3 + 1
    lines = figure.axes[-1].get_lines()
    assert len(lines) == 3
    for line in lines:
        assert line.get_xdata()[0] == plots.BLACK_BORDER
        assert line.get_ydata().sum() == pytest.approx(100.0)  # shares of the pixels that are not border
    assert "50.6% border" in figure.axes[-1].get_legend().get_texts()[0].get_text()


def test_roc_figure_names_an_absent_class_without_a_curve():
    per_class = {"a": {"roc_auc": 0.75, "support": 2}, "b": {"roc_auc": None, "support": 0}}
    curves = {"a": metrics.roc_curve([True, True, False], [0.9, 0.2, 0.5]), "b": None}
    figure = plots.roc_figure(curves, per_class, "absent class")
    axes = figure.axes[0]
    assert len(axes.get_lines()) == 2  # a's curve and the chance diagonal
    assert any("b: undefined" in text.get_text() for text in axes.get_legend().get_texts())


def test_confusion_matrix_figure_survives_an_absent_class(tmp_path):
    figure = plots.confusion_matrix_figure(np.array([[2, 1], [0, 0]]), ["a", "b"], "absent")
    assert os.path.getsize(plots.save(figure, str(tmp_path / "cm.png"))) > 0
