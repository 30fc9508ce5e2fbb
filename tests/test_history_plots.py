"""Training curves (``xray_tf.history_plots``): axes per quantity and per loss, recalls, kept epochs.

Figures drawn from real runs are checked in test_scripts and test_report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fake_runs import make_run

from xray_tf import history_plots, rundir


def test_history_figure_has_two_axes_and_two_lines_per_run(tmp_path):
    histories = {f"run{i}": rundir.read_history(make_run(tmp_path, f"run{i}", i, {"train": 0.5}, (0.3, 0.5, 0.6)))
                 for i in range(3)}
    figure = history_plots.history_figure(histories, "three runs")
    assert len(figure.axes) == 2
    for axes in figure.axes:
        lines = axes.get_lines()
        assert len(lines) == 6
        assert [line.get_linestyle() for line in lines] == ["-", "--"] * 3  # train solid, validation dashed
        assert len({line.get_color() for line in lines}) == 3  # one colour per run
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["run0", "run1", "run2", "train", "validation"]


def _recall_history(recalls: dict[str, list[float]], losses: list[float]) -> pd.DataFrame:
    """A history.csv with per-class recalls (validation: train's minus 0.1) and the given losses."""
    frame = pd.DataFrame({"epoch": range(1, len(losses) + 1), "accuracy": 0.5, "val_accuracy": 0.4, "loss": losses,
                          "val_loss": [value + 0.1 for value in losses]})
    for suffix, values in recalls.items():
        frame[f"recall_{suffix}"], frame[f"val_recall_{suffix}"] = values, [value - 0.1 for value in values]
    return frame


def test_history_figure_adds_balanced_accuracy_recalls_kept_epochs_and_a_loss_axes_per_loss():
    histories = {"ce_run": _recall_history({"a": [0.5, 0.7, 0.9], "b": [0.3, 0.5, 0.5]}, [1.0, 0.8, 0.7]),
                 "focal_run": _recall_history({"a": [0.6, 0.6], "b": [0.2, 0.4]}, [0.2, 0.1])}
    figure = history_plots.history_figure(histories, kept_epochs={"ce_run": 2, "focal_run": None},
                                  losses={"ce_run": "cross-entropy", "focal_run": "focal"})
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["Accuracy", "Balanced accuracy", "Loss: cross-entropy", "Loss: focal", "Recall: a", "Recall: b"]
    balanced = figure.axes[1].get_lines()
    np.testing.assert_allclose(balanced[1].get_ydata(), [30, 50, 60])  # ce_run's validation: mean recall, in %
    kept = [line for line in balanced if line.get_marker() == "*"]
    assert len(kept) == 1 and list(kept[0].get_xdata()) == [2] and list(kept[0].get_ydata()) == pytest.approx([50])
    for axes, run in ((figure.axes[2], "ce_run"), (figure.axes[3], "focal_run")):  # each loss on its own axes
        assert [list(line.get_ydata()) for line in axes.get_lines() if line.get_marker() != "*"][0] == \
            pytest.approx(list(histories[run]["loss"]))
    assert [text.get_text() for text in figure.legends[0].get_texts()][-1] == "kept epoch"


def test_run_histories_figure_reads_each_runs_loss_and_kept_epoch(tmp_path):
    selection = {"metrics.json": {"model_selection": {"best_epoch": 2}}}
    runs = {name: make_run(tmp_path, name, 0, {}, (0.3, 0.5, 0.6), flags=flags, extra_files=selection)
            for name, flags in (("ce", {"loss": "ce"}), ("focal", {"loss": "focal", "class_weight": "balanced"}))}
    figure = history_plots.run_histories_figure(runs)
    assert [axes.get_title() for axes in figure.axes] == [
        "Accuracy", "Loss: cross-entropy", "Loss: focal (γ=2, α=0.25), balanced class weights"]
    assert sum(line.get_marker() == "*" for line in figure.axes[0].get_lines()) == 2
