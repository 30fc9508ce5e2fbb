"""scripts/: run_paper, results_table, plot_histories, explore_dataset.

The table maths are in test_reports, the figures in test_plots, run_paper's ImageNet check in test_run_paper.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO_ROOT, shared_data
from fake_runs import make_run

from xray_tf import data, reports
from xray_tf.backbones import BACKBONES

pytestmark = pytest.mark.slow  # whole training runs in processes of their own

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
    low, high = (100 * bound for bound in training["train"]["ci95"]["accuracy"])
    assert f"| PRCE | 0 | {100 * training['train']['accuracy']:.1f} [{low:.1f}, {high:.1f}] |" in markdown


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


def test_results_table_of_hand_made_runs_shows_intervals_and_the_paper(tmp_path):
    evaluated = {"accuracy": 0.62, "balanced_accuracy": 0.5, "macro_f1": 0.4,
                 "ci95": {"accuracy": [0.58, 0.66], "balanced_accuracy": [0.45, 0.55], "macro_f1": [0.35, 0.45]}}
    make_run(tmp_path / "runs", "prfl_seed0", 0, {"train": 0.9, "val": 0.8},
             extra_files={"metrics_test.json": evaluated})
    out = tmp_path / "tables" / "table"
    result = run_script("results_table.py", str(tmp_path / "runs"), f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    prfl = next(line for line in result.stdout.splitlines() if line.startswith("| PRFL |"))
    assert "| 62.0 [58.0, 66.0] |" in prfl and prfl.endswith("| 85.84 / 75.0 / 75.5 |")
    assert open(f"{out}.md").read() in result.stdout and "Bolhassani" in result.stdout
    assert pd.read_csv(f"{out}.csv").loc[0, "test_accuracy_ci95_low"] == 0.58
    assert pd.read_csv(f"{out}_runs.csv").loc[0, "test_source"] == "metrics_test.json"
    result = run_script("results_table.py", str(tmp_path / "nowhere"), f"--out={out}")
    assert result.returncode != 0 and "nowhere: not a directory" in result.stderr


# --- plot_histories -------------------------------------------------------------------------------

def test_plot_histories_draws_the_runs_it_is_given(tmp_path, paper_results):
    hand_made = make_run(tmp_path, "hand_made", 0, {"train": 0.5}, (0.4, 0.6, 0.7))
    out = tmp_path / "fig" / "histories.png"
    result = run_script("plot_histories.py", hand_made, os.path.join(paper_results, "prce_seed0"), f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_png(str(out))
    result = run_script("plot_histories.py", str(tmp_path / "nowhere"), f"--out={out}")
    assert result.returncode != 0 and "nowhere: not a directory" in result.stderr


# --- run_paper's plan ------------------------------------------------------------------------------

@pytest.fixture
def cached_imagenet(tmp_path, monkeypatch) -> None:
    """``$KERAS_HOME`` (inherited by the scripts) holds every backbone's ImageNet file, so that planning an
    ImageNet experiment needs no network; what it checks when they are missing is in test_run_paper."""
    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    for entry in BACKBONES.values():
        if entry.imagenet_weights:
            (cache / os.path.basename(entry.imagenet_weights)).write_bytes(b"")  # only their presence is checked
    monkeypatch.setenv("KERAS_HOME", str(cache.parent))


@pytest.fixture
def paper_flags(tmp_path, cached_imagenet) -> str:
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


def test_the_repositorys_flagfiles_plan_the_six_experiments(tmp_path, cached_imagenet):
    flags_dir = os.path.join(REPO_ROOT, "flags")
    missing = [n for n in reports.PAPER_EXPERIMENTS if not os.path.isfile(os.path.join(flags_dir, f"{n}.cfg"))]
    if missing:
        pytest.skip(f"flags/ does not have {', '.join(missing)} yet")
    result = run_script("run_paper.py", f"--results_dir={tmp_path / 'out'}", "--seeds=0", "--dry_run",
                        "--skip_missing_chexnet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(line.startswith(tuple(reports.PAPER_EXPERIMENTS)) for line in result.stdout.splitlines()) == 6


# --- explore_dataset ------------------------------------------------------------------------------

def test_explore_dataset_on_synthetic_data(tiny_dataset, tmp_path):
    result = run_script("explore_dataset.py", f"--data_dir={tiny_dataset}", f"--out_dir={tmp_path}",
                        "--image_size=64", "--max_images_per_class=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "COVID-19" in result.stdout
    for name in ("figure1_class_counts.png", "figure2_samples_intensities.png"):
        assert_png(str(tmp_path / name))
    result = run_script("explore_dataset.py", f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path}")
    assert result.returncode != 0 and "nothing: not a directory." in result.stderr


def test_explore_dataset_on_real_data(tmp_path):
    coronahack = shared_data("coronahack")
    result = run_script("explore_dataset.py", f"--data_dir={coronahack}", f"--out_dir={tmp_path}",
                        "--image_size=64", "--max_images_per_class=10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert data.load_index(coronahack).summary() in result.stdout  # the splits training uses (seed 0)
    assert_png(str(tmp_path / "figure1_class_counts.png"))
    assert_png(str(tmp_path / "figure2_samples_intensities.png"))
