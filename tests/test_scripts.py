"""scripts/: run_paper, results_table, plot_histories, explore_dataset, and the table maths behind them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT, shared_data
from xray_tf import data, plots, reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", name), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def assert_png(path: str) -> None:
    assert os.path.getsize(path) > 10_000, path
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC


def load(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def make_run(root, name: str, seed: int, accuracies: dict, epochs_accuracy=(0.5, 0.7), flags: dict | None = None,
             extra_files: dict | None = None) -> str:
    """A hand-made run directory: flags.txt, metrics.json with the given split accuracies, history.csv."""
    run_dir = os.path.join(str(root), name)
    os.makedirs(run_dir)
    settings = {"task": "four_class", "image_size": "32", "model": "resnet50", "seed": str(seed),
                "run_name": name, "output_dir": str(root), **(flags or {})}
    with open(os.path.join(run_dir, "flags.txt"), "w") as handle:
        handle.write("".join(f"--{k}={v}\n" for k, v in settings.items()))
    splits = {split: {"accuracy": value, "balanced_accuracy": value / 2, "macro_f1": value / 4}
              for split, value in accuracies.items()}
    with open(os.path.join(run_dir, "metrics.json"), "w") as handle:
        json.dump({"splits": splits}, handle)
    for file_name, payload in (extra_files or {}).items():
        with open(os.path.join(run_dir, file_name), "w") as handle:
            json.dump(payload, handle)
    pd.DataFrame({"epoch": range(1, len(epochs_accuracy) + 1), "loss": 1.0, "accuracy": epochs_accuracy,
                  "val_loss": 1.2, "val_accuracy": [a - 0.1 for a in epochs_accuracy]}).to_csv(
        os.path.join(run_dir, "history.csv"), index=False)
    return run_dir


# --- mean ± std and the table, on hand-made runs ------------------------------------------------

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
    runs, table = reports.summarise(reports.find_runs([str(tmp_path)]))
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
    assert "| 90.0 ± 10.0 | 70.0 ± 10.0 | n/a |" in prce_line and reports.NOT_FOUND in prce_line
    rce_line = next(line for line in markdown.splitlines() if line.startswith("| RCE |"))
    assert "| 50.0 | 40.0 | 30.0 |" in rce_line


def test_evaluate_output_takes_precedence_over_training_metrics(tmp_path):
    later = {"accuracy": 0.61, "balanced_accuracy": 0.5, "macro_f1": 0.4}
    make_run(tmp_path, "prfl_seed0", 0, {"train": 0.9, "val": 0.8}, extra_files={"metrics_test.json": later})
    runs, table = reports.summarise([str(tmp_path / "prfl_seed0")])
    assert runs.loc[0, "test_accuracy"] == 0.61 and runs.loc[0, "test_source"] == "metrics_test.json"
    assert runs.loc[0, "val_source"] == "metrics.json"


def test_extra_data_runs_form_their_own_rows(tmp_path):
    make_run(tmp_path, "pdcxfl_seed0", 0, {"train": 0.9, "val": 0.8})
    make_run(tmp_path, "pdcxfl_extra_seed0", 0, {"train": 0.95, "val": 0.85}, flags={"extra_data": "/x"})
    _, table = reports.summarise(reports.find_runs([str(tmp_path)]))
    assert list(table["experiment"]) == ["pdcxfl", "pdcxfl_extra"]
    assert "| PDCXFL + extra COVID-19 |" in reports.markdown_table(table)


def test_runs_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path):
    make_run(tmp_path, "prce_seed0", 0, {"train": 0.9})
    make_run(tmp_path, "prce_seed1", 1, {"train": 0.8}, flags={"image_size": "64"})
    with pytest.raises(reports.RunError, match="differ in --image_size"):
        reports.summarise(reports.find_runs([str(tmp_path)]))


def test_two_runs_with_one_seed_are_refused(tmp_path):
    make_run(tmp_path, "prce_seed0", 0, {"train": 0.9})
    make_run(tmp_path, "prce_seed0-2", 0, {"train": 0.8})
    with pytest.raises(reports.RunError, match="several runs with seed 0"):
        reports.summarise(reports.find_runs([str(tmp_path)]))


def test_unreadable_inputs_name_the_file(tmp_path):
    run_dir = make_run(tmp_path, "prce_seed0", 0, {"train": 0.9})
    pd.DataFrame({"loss": [1.0]}).to_csv(os.path.join(run_dir, "history.csv"), index=False)
    with pytest.raises(reports.RunError, match=r"history\.csv: missing column\(s\) accuracy, val_loss"):
        reports.read_history(run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(reports.RunError, match="empty: neither a run directory"):
        reports.find_runs([str(tmp_path / "empty")])


# --- the table and figures of a real (tiny) sweep --------------------------------------------------

def test_sweep_table_equals_the_runs_files(paper_results):
    run_dir = os.path.join(paper_results, "prce_seed0")
    table = pd.read_csv(os.path.join(paper_results, "table.csv"))
    runs = pd.read_csv(os.path.join(paper_results, "table_runs.csv"))
    assert list(table["experiment"]) == ["prce"] and list(runs["seed"]) == [0]
    training = load(os.path.join(run_dir, "metrics.json"))["splits"]
    row = table.iloc[0]
    assert row["train_accuracy_mean"] == pytest.approx(training["train"]["accuracy"])
    for split in ("val", "test"):
        evaluated = load(os.path.join(run_dir, f"metrics_{split}.json"))
        assert runs.loc[0, f"{split}_source"] == f"metrics_{split}.json"
        assert row[f"{split}_accuracy_mean"] == pytest.approx(evaluated["accuracy"])
        assert row[f"{split}_balanced_accuracy_mean"] == pytest.approx(evaluated["balanced_accuracy"])
        assert row[f"{split}_macro_f1_mean"] == pytest.approx(evaluated["macro_f1"])
    history = pd.read_csv(os.path.join(run_dir, "history.csv"))
    assert row["train_avg_accuracy_over_epochs_mean"] == pytest.approx(history["accuracy"].mean())
    assert row["val_avg_accuracy_over_epochs_mean"] == pytest.approx(history["val_accuracy"].mean())
    markdown = open(os.path.join(paper_results, "table.md")).read()
    assert f"| PRCE | 0 | {100 * training['train']['accuracy']:.1f} |" in markdown


def test_sweep_writes_its_figures(paper_results):
    figures = os.path.join(paper_results, "figures")
    assert sorted(os.listdir(figures)) == ["figure1_class_counts.png", "figure2_samples_intensities.png",
                                           "histories_seed0.png"]
    for name in os.listdir(figures):
        assert_png(os.path.join(figures, name))
    assert os.path.isfile(os.path.join(paper_results, "logs", "prce_seed0.log"))


def test_sweep_does_not_rerun_finished_runs(paper_results, tiny_dataset):
    result = run_script("run_paper.py", f"--results_dir={paper_results}", "--flags_dir=" +
                        os.path.join(os.path.dirname(paper_results), "flags"), "--experiments=prce", "--seeds=0",
                        f"--data_dir={tiny_dataset}", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prce_seed0: done already" in result.stdout


# --- history figures ---------------------------------------------------------------------------------

def test_history_figure_has_two_axes_and_two_lines_per_run(tmp_path):
    histories = {f"run{i}": reports.read_history(make_run(tmp_path, f"run{i}", i, {"train": 0.5}, (0.3, 0.5, 0.6)))
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


def test_plot_histories_reads_an_old_history_csv(tmp_path, paper_results):
    old = tmp_path / "old_run"
    old.mkdir()
    pd.DataFrame({"loss": [1.2, 0.9, 0.7], "accuracy": [0.4, 0.6, 0.7], "val_loss": [1.3, 1.1, 1.0],
                  "val_accuracy": [0.35, 0.5, 0.55]}).to_csv(old / "history.csv", index=False)  # no epoch column
    out = tmp_path / "fig" / "histories.png"
    result = run_script("plot_histories.py", str(old), os.path.join(paper_results, "prce_seed0"), f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_png(str(out))
    result = run_script("plot_histories.py", str(tmp_path / "nowhere"), f"--out={out}")
    assert result.returncode != 0 and "nowhere: not a directory" in result.stderr


# --- run_paper's plan ------------------------------------------------------------------------------

@pytest.fixture
def paper_flags(tmp_path) -> str:
    """Six flagfiles like the paper's: the two CheXNet ones name a weights file that does not exist."""
    flags_dir = tmp_path / "flags"
    flags_dir.mkdir()
    for name in ("prce", "prcw", "prfl", "rce"):
        (flags_dir / f"{name}.cfg").write_text("--model=resnet50\n--run_name=from_flagfile\n")
    for name in ("pdcxce", "pdcxfl"):
        (flags_dir / f"{name}.cfg").write_text("# CheXNet\n--model=densenet_chexnet\n--chexnet_weights=/no/such.h5\n")
    return str(flags_dir)


def test_plan_covers_six_experiments_seeds_and_extra(paper_flags, tmp_path):
    chexnet = tmp_path / "chexnet.weights.h5"
    chexnet.write_bytes(b"")  # the plan only checks that it exists
    result = run_script("run_paper.py", f"--results_dir={tmp_path / 'out'}", f"--flags_dir={paper_flags}",
                        "--seeds=0,1", "--with_extra", f"--extra_data={tmp_path}", "--dry_run", "--",
                        "--epochs=1", f"--chexnet_weights={chexnet}")
    assert result.returncode == 0, result.stderr[-2000:]
    planned = [line.split(":")[0] for line in result.stdout.splitlines() if line.endswith(": to run")]
    assert len(planned) == 6 * 2 * 2
    assert "prce_seed0" in planned and "pdcxfl_extra_seed1" in planned
    command = next(line for line in result.stdout.splitlines() if "--run_name=pdcxce_extra_seed1" in line)
    # The flagfile first, then the overrides, then what the sweep sets: later flags win.
    order = ["--flagfile=", "--extra_data=", "--epochs=1", "--chexnet_weights=", "--seed=1", "--output_dir=",
             "--run_name=pdcxce_extra_seed1"]
    positions = [command.index(part) for part in order]
    assert positions == sorted(positions)
    assert not os.path.exists(tmp_path / "out")  # a dry run writes nothing


def test_missing_chexnet_weights_stop_before_anything_runs_or_are_skipped(paper_flags, tmp_path):
    args = [f"--results_dir={tmp_path / 'out'}", f"--flags_dir={paper_flags}", "--seeds=0", "--dry_run"]
    result = run_script("run_paper.py", *args)
    assert result.returncode != 0
    assert "pdcxce_seed0: --chexnet_weights='/no/such.h5' is not a file" in result.stderr
    result = run_script("run_paper.py", *args, "--skip_missing_chexnet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pdcxfl_seed0: SKIPPED" in result.stdout and "prce_seed0: to run" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--experiments=prce,nope"], "No such flagfile(s): "),
    (["--", "--seed=3"], "Do not pass --seed after --"),
    (["--", "--epochs"], "must be --name=value"),
    (["--seeds=0,x"], "expected comma-separated integers"),
    (["--with_extra"], "--with_extra needs --extra_data"),
])
def test_bad_sweep_arguments_are_one_clear_error(paper_flags, tmp_path, args, message):
    result = run_script("run_paper.py", f"--results_dir={tmp_path / 'out'}", f"--flags_dir={paper_flags}",
                        "--experiments=prce", "--dry_run", *args)  # a later --experiments wins
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_a_trained_run_is_only_evaluated_where_that_is_missing(paper_flags, tmp_path):
    make_run(tmp_path / "out", "prce_seed0", 0, {"train": 0.9}, extra_files={"metrics_val.json": {}})
    result = run_script("run_paper.py", f"--results_dir={tmp_path / 'out'}", f"--flags_dir={paper_flags}",
                        "--experiments=prce", "--seeds=0", "--evaluate_splits=val,test", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prce_seed0: trained already; to evaluate on test" in result.stdout


def test_an_unfinished_run_stops_the_sweep(paper_flags, tmp_path):
    (tmp_path / "out" / "prce_seed0").mkdir(parents=True)
    result = run_script("run_paper.py", f"--results_dir={tmp_path / 'out'}", f"--flags_dir={paper_flags}",
                        "--experiments=prce", "--seeds=0", "--dry_run")
    assert result.returncode != 0 and "exists but is unfinished" in result.stderr


def test_the_repositorys_flagfiles_plan_the_six_experiments(tmp_path):
    flags_dir = os.path.join(REPO_ROOT, "flags")
    missing = [n for n in reports.PAPER_EXPERIMENTS if not os.path.isfile(os.path.join(flags_dir, f"{n}.cfg"))]
    if missing:
        pytest.skip(f"flags/ does not have {', '.join(missing)} yet")
    result = run_script("run_paper.py", f"--results_dir={tmp_path / 'out'}", "--seeds=0", "--dry_run",
                        "--skip_missing_chexnet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(line.startswith(tuple(reports.PAPER_EXPERIMENTS)) for line in result.stdout.splitlines()) == 6


# --- dataset figures -------------------------------------------------------------------------------

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


def test_explore_dataset_on_synthetic_data(tiny_dataset, tmp_path):
    result = run_script("explore_dataset.py", f"--data_dir={tiny_dataset}", f"--out_dir={tmp_path}",
                        "--image_size=64", "--max_images_per_class=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "COVID-19" in result.stdout
    for name in ("figure1_class_counts.png", "figure2_samples_intensities.png"):
        assert_png(str(tmp_path / name))
    result = run_script("explore_dataset.py", f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path}")
    assert result.returncode != 0 and "Chest_xray_Corona_Metadata.csv" in result.stderr


def test_explore_dataset_on_real_data(tmp_path):
    coronahack = shared_data("coronahack")
    result = run_script("explore_dataset.py", f"--data_dir={coronahack}", f"--out_dir={tmp_path}",
                        "--image_size=64", "--max_images_per_class=10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert data.load_index(coronahack).summary() in result.stdout  # the splits training uses (seed 0)
    assert_png(str(tmp_path / "figure1_class_counts.png"))
    assert_png(str(tmp_path / "figure2_samples_intensities.png"))
