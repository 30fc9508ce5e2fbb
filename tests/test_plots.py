"""The figures (``xray_tf.plots``): their axes, lines and legends, and classes without images.

Figures written by real runs are checked in test_evaluate and test_scripts.
"""

from __future__ import annotations

import os

import numpy as np
from fake_runs import make_run

from xray_tf import metrics, plots, rundir


def test_history_figure_has_two_axes_and_two_lines_per_run(tmp_path):
    histories = {f"run{i}": rundir.read_history(make_run(tmp_path, f"run{i}", i, {"train": 0.5}, (0.3, 0.5, 0.6)))
                 for i in range(3)}
    figure = plots.history_figure(histories, "three runs")
    assert len(figure.axes) == 2
    for axes in figure.axes:
        lines = axes.get_lines()
        assert len(lines) == 6
        assert [line.get_linestyle() for line in lines] == ["-", "--"] * 3  # train solid, validation dashed
        assert len({line.get_color() for line in lines}) == 3  # one colour per run
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["run0", "run1", "run2", "train", "validation"]


def test_dataset_figures_have_their_axes_and_lines():
    counts = {"train": {"a": 10, "b": 5, "c": 1}, "val": {"a": 2, "b": 1, "c": 0}, "test": {"a": 0, "b": 0, "c": 0}}
    figure = plots.class_counts_figure(counts)
    assert len(figure.axes) == 2
    assert all(len(axes.patches) == 2 * 3 for axes in figure.axes)  # two splits with images, three classes
    rng = np.random.default_rng(0)
    samples = {name: [rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(2)] for name in "abc"}
    histograms = {name: np.full(256, 1 / 256) for name in "abc"}
    figure = plots.samples_and_intensities_figure(samples, histograms, dict.fromkeys("abc", 2))
    assert len(figure.axes) == 2 * 3 + 1
    assert len(figure.axes[-1].get_lines()) == 3


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
