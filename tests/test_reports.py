"""The paper's table (``xray_tf.reports``) on hand-made runs: mean ± std over seeds, which file a
number comes from, and the runs it refuses to average. The table of a real sweep: test_scripts."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from fake_runs import make_run

from xray_tf import reports, rundir


def test_mean_std_by_hand():
    assert reports.mean_std([0.8, 0.9, 1.0]) == (pytest.approx(0.9), pytest.approx(0.1), 3)  # sample std (n - 1)
    assert reports.mean_std([0.5, None, 0.7]) == (pytest.approx(0.6), pytest.approx(np.sqrt(0.02)), 2)
    assert reports.mean_std([0.42]) == (pytest.approx(0.42), None, 1)
    assert reports.mean_std([None]) == (None, None, 0)
    assert reports.format_mean_std(0.9, 0.1, 3, 3) == "90.0 ± 10.0"
    assert reports.format_mean_std(0.42, None, 1, 1) == "42.0"
    assert reports.format_mean_std(0.6, 0.05, 2, 3) == "60.0 ± 5.0 (n=2)"
    assert reports.format_mean_std(None, None, 0, 3) == "n/a"


def test_table_averages_seeds_and_keeps_experiments_apart(tmp_path):
    for seed, accuracy in enumerate((0.8, 0.9, 1.0)):
        make_run(tmp_path, f"prce_seed{seed}", seed, {"train": accuracy, "val": accuracy - 0.2},
                 epochs_accuracy=(0.4 + 0.1 * seed, 0.6))
    make_run(tmp_path, "rce_seed0", 0, {"train": 0.5, "val": 0.4, "test": 0.3})
    runs, table = reports.summarise(rundir.find_runs([str(tmp_path)]))
    assert list(table["experiment"]) == ["prce", "rce"]  # the paper's order
    prce = table.set_index("experiment").loc["prce"]
    assert prce["runs"] == 3 and prce["seeds"] == "0 1 2"
    assert prce["train_accuracy_mean"] == pytest.approx(0.9) and prce["train_accuracy_std"] == pytest.approx(0.1)
    assert prce["val_accuracy_mean"] == pytest.approx(0.7) and prce["val_accuracy_std"] == pytest.approx(0.1)
    assert prce["val_macro_f1_mean"] == pytest.approx(0.7 / 4)
    assert prce["test_accuracy_n"] == 0 and pd.isna(prce["test_accuracy_mean"])
    # The paper's metric: per run the mean over epochs of history.csv, then mean ± std over seeds.
    per_run = [np.mean([0.4, 0.6]), np.mean([0.5, 0.6]), np.mean([0.6, 0.6])]
    assert prce["train_avg_accuracy_over_epochs_mean"] == pytest.approx(np.mean(per_run))
    assert prce["train_avg_accuracy_over_epochs_std"] == pytest.approx(np.std(per_run, ddof=1))
    markdown = reports.markdown_table(table)
    prce_line = next(line for line in markdown.splitlines() if line.startswith("| PRCE |"))
    assert "| 90.0 ± 10.0 | 70.0 ± 10.0 | n/a |" in prce_line and "| 81.06 / 65.39 / 62.1 |" in prce_line
    rce_line = next(line for line in markdown.splitlines() if line.startswith("| RCE |"))
    assert "| 50.0 | 40.0 | 30.0 |" in rce_line


def test_evaluate_output_takes_precedence_over_training_metrics(tmp_path):
    later = {"accuracy": 0.61, "balanced_accuracy": 0.5, "macro_f1": 0.4}
    make_run(tmp_path, "prfl_seed0", 0, {"train": 0.9, "val": 0.8}, extra_files={"metrics_test.json": later})
    runs, table = reports.summarise([str(tmp_path / "prfl_seed0")])
    assert runs.loc[0, "test_accuracy"] == 0.61 and runs.loc[0, "test_source"] == "metrics_test.json"
    assert runs.loc[0, "val_source"] == "metrics.json"


def test_a_single_run_shows_its_intervals_and_published_numbers_sit_beside(tmp_path):
    evaluated = {"accuracy": 0.62, "balanced_accuracy": 0.5, "macro_f1": 0.4,
                 "ci95": {"accuracy": [0.58, 0.66], "balanced_accuracy": None, "macro_f1": [0.35, 0.45]}}
    make_run(tmp_path, "pdcxce_seed0", 0, {"train": 0.9, "val": 0.8}, extra_files={"metrics_test.json": evaluated})
    for seed in (0, 1):
        make_run(tmp_path, f"prcw_seed{seed}", seed, {"train": 0.9, "val": 0.8},
                 extra_files={"metrics_test.json": evaluated})
    make_run(tmp_path, "mine_seed0", 0, {"train": 0.9})
    runs, table = reports.summarise(rundir.find_runs([str(tmp_path)]))
    single = table.set_index("experiment").loc["pdcxce"]
    assert (single["test_accuracy_ci95_low"], single["test_accuracy_ci95_high"]) == (0.58, 0.66)
    markdown = reports.markdown_table(table)
    lines = {line.split(" | ")[0]: line for line in markdown.splitlines() if line.startswith("| ")}
    # Tst acc, then Val bal. acc and macro F1 (no interval in metrics.json), then Tst bal. acc (null) and macro F1.
    assert "| 62.0 [58.0, 66.0] | 40.0 | 20.0 | 50.0 | 40.0 [35.0, 45.0] |" in lines["| PDCXCE"]
    assert "| 85.28 / 76.062 / 80.0 |" in lines["| PDCXCE"]
    assert "| 62.0 ± 0.0 |" in lines["| PRCW"] and "[" not in lines["| PRCW"]  # seeds: mean ± std only
    assert lines["| mine"].endswith(f"| {reports.NOT_FOUND} |")
    assert runs.set_index("experiment").loc["pdcxce", "test_macro_f1_ci95_high"] == 0.45


def test_extra_data_runs_form_their_own_rows(tmp_path):
    make_run(tmp_path, "pdcxfl_seed0", 0, {"train": 0.9, "val": 0.8})
    make_run(tmp_path, "pdcxfl_extra_seed0", 0, {"train": 0.95, "val": 0.85}, flags={"extra_data": "/x"})
    _, table = reports.summarise(rundir.find_runs([str(tmp_path)]))
    assert list(table["experiment"]) == ["pdcxfl", "pdcxfl_extra"]
    assert "| PDCXFL + extra COVID-19 |" in reports.markdown_table(table)


def test_runs_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path):
    make_run(tmp_path, "prce_seed0", 0, {"train": 0.9})
    make_run(tmp_path, "prce_seed1", 1, {"train": 0.8}, flags={"image_size": "64"})
    with pytest.raises(rundir.RunError, match="differ in --image_size"):
        reports.summarise(rundir.find_runs([str(tmp_path)]))


def test_two_runs_with_one_seed_are_refused(tmp_path):
    make_run(tmp_path, "prce_seed0", 0, {"train": 0.9})
    make_run(tmp_path, "prce_seed0-2", 0, {"train": 0.8})
    with pytest.raises(rundir.RunError, match="several runs with seed 0"):
        reports.summarise(rundir.find_runs([str(tmp_path)]))


def test_unreadable_inputs_name_the_file(tmp_path):
    run_dir = make_run(tmp_path, "prce_seed0", 0, {"train": 0.9})
    pd.DataFrame({"loss": [1.0]}).to_csv(os.path.join(run_dir, "history.csv"), index=False)
    with pytest.raises(rundir.RunError, match=r"history\.csv: missing column\(s\) epoch, accuracy, val_loss"):
        rundir.read_history(run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(rundir.RunError, match="empty: neither a run directory"):
        rundir.find_runs([str(tmp_path / "empty")])
