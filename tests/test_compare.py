"""``xray_tf.comparison`` (``xray-compare``): paired differences on hand-made predictions files, the
runs it refuses, and one short run of the command on two untrained tiny models."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import run_module
from fake_runs import make_run

from xray_tf import comparison, metrics, rundir, statistics

CLASSES = ["Normal", "Bacteria", "Virus", "COVID-19"]
COLUMNS = [f"p_{metrics.metric_suffix(name)}" for name in CLASSES]


def predictions(y_true: np.ndarray, y_pred: np.ndarray, seed: int) -> pd.DataFrame:
    """A predictions table, as xray-evaluate writes it, of images ``img<i>.png`` whose argmax is ``y_pred``."""
    probabilities = np.random.default_rng(seed).dirichlet(np.ones(len(CLASSES)), size=len(y_true))
    probabilities[np.arange(len(y_true)), y_pred] += 1.0
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    table = pd.DataFrame({"file": [f"/data/img{i}.png" for i in range(len(y_true))],
                          "true_class": [CLASSES[i] for i in y_true], "predicted_class": [CLASSES[i] for i in y_pred]})
    for column, values in zip(COLUMNS, probabilities.T):
        table[column] = values
    return table


@pytest.fixture(scope="module")
def two_runs_predictions() -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """A right on 150 of 200 images, B on 130: A alone is right on 30 of them and B alone on 10."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=200)  # COVID-19 absent, as in the organizers' TEST split
    y_true[:4] = 3 - 3 * (np.arange(4) % 2)  # ...but for two images
    wrong = (y_true + 1) % 4
    a_right = np.arange(200) < 150
    b_right = (np.arange(200) < 120) | ((np.arange(200) >= 150) & (np.arange(200) < 160))
    a = predictions(y_true, np.where(a_right, y_true, wrong), seed=1)
    b = predictions(y_true, np.where(b_right, y_true, wrong), seed=2)
    return a, b, y_true


def read_back(table: pd.DataFrame, run_dir) -> pd.DataFrame:
    """``table`` as a run's test predictions, read as compare_runs reads them."""
    run_dir.mkdir()
    table.to_csv(run_dir / rundir.predictions_of_split("test"), index=False)
    return rundir.read_predictions(str(run_dir), "test", COLUMNS)


def test_differences_are_of_each_runs_report(two_runs_predictions, tmp_path):
    a, b, y_true = two_runs_predictions
    shuffled = b.sample(frac=1.0, random_state=0)  # rows are paired by file, not by position
    frame_a, frame_b = read_back(a, tmp_path / "a"), read_back(shuffled, tmp_path / "b")
    result = comparison.compare_predictions(frame_a, frame_b, CLASSES, resamples=500)

    def report(table: pd.DataFrame) -> dict:
        probabilities = table[COLUMNS].to_numpy()
        matrix = metrics.confusion_matrix(y_true, probabilities.argmax(axis=1), len(CLASSES))
        return metrics.classification_report(matrix, CLASSES, y_true, probabilities, resamples=1)

    report_a, report_b = report(a), report(b)
    assert report_a["accuracy"] == pytest.approx(0.75) and report_b["accuracy"] == pytest.approx(0.65)
    assert set(result["metrics"]) == set(report_a["ci95"])
    for name, row in result["metrics"].items():
        key = name.split("_", 1)
        expected_a = report_a[name] if name in report_a else report_a["per_class"][key[1]][key[0]]
        expected_b = report_b[name] if name in report_b else report_b["per_class"][key[1]][key[0]]
        assert row["a"] == pytest.approx(expected_a) and row["b"] == pytest.approx(expected_b), name
        assert row["difference"] == pytest.approx(expected_a - expected_b), name
        assert row["ci95"][0] <= row["difference"] <= row["ci95"][1], name
    low, high = result["metrics"]["accuracy"]["ci95"]
    assert 0.0 < low < 0.1 < high  # 20 more images right out of 200: a difference the bootstrap sees
    assert result["mcnemar"] == {"only_a_correct": 30, "only_b_correct": 10,
                                 "p_value": statistics.mcnemar_p_value(30, 10)}
    assert result["mcnemar"]["p_value"] < 0.01 and result["resampled_by"] == "image"


def test_a_run_against_itself_differs_by_nothing(two_runs_predictions, tmp_path):
    frame = read_back(two_runs_predictions[0], tmp_path / "a")
    result = comparison.compare_predictions(frame, frame, CLASSES, resamples=200)
    assert result["metrics"]["accuracy"] == {"a": 0.75, "b": 0.75, "difference": 0.0, "ci95": [0.0, 0.0]}
    assert result["mcnemar"]["p_value"] == 1.0
    text = comparison.markdown(result)
    assert "| accuracy | 75.0 | 75.0 | +0.0 | [+0.0, +0.0] |" in text
    assert "| recall_Virus |" in text and "p = 1" in text


def test_patients_are_resampled_together(two_runs_predictions, tmp_path):
    a, b, _ = two_runs_predictions
    a = a.assign(patient=[f"person{i // 2}" for i in range(len(a))])
    result = comparison.compare_predictions(read_back(a, tmp_path / "a"), b, CLASSES, resamples=200)
    assert result["resampled_by"] == "patient"
    json.dumps(result, allow_nan=False)  # undefined values are null, not NaN


def test_different_images_or_classes_are_refused(two_runs_predictions):
    a, b, _ = two_runs_predictions
    with pytest.raises(rundir.RunError, match=r"different images \(1 only in the first, 0 only in the second.*"
                                              r"--split=test"):
        comparison.compare_predictions(a, b.iloc[1:], CLASSES, ("RUN_A", "RUN_B"))
    relabelled = b.copy()
    relabelled.loc[5, "true_class"] = "Virus" if relabelled.loc[5, "true_class"] != "Virus" else "Normal"
    with pytest.raises(rundir.RunError, match="img5.png different true classes"):
        comparison.compare_predictions(a, relabelled, CLASSES)
    with pytest.raises(rundir.RunError, match=r"RUN_A and RUN_B: true class\(es\) \['Fungus'\] are not among"):
        comparison.compare_predictions(a.assign(true_class="Fungus"), b.assign(true_class="Fungus"), CLASSES,
                                       ("RUN_A", "RUN_B"))


def fake_run(root, name: str, seed: int = 0, flags: dict | None = None, classes: list[str] = CLASSES) -> str:
    run_dir = make_run(root, name, seed, {"train": 0.5}, flags=flags)
    rundir.write_json(os.path.join(run_dir, rundir.CLASSES), classes)
    return run_dir


def test_runs_of_other_tasks_classes_or_val_splits_are_refused(tmp_path):
    base = fake_run(tmp_path, "base")
    binary = fake_run(tmp_path, "binary", flags={"task": "bacteria_vs_virus"})
    with pytest.raises(rundir.RunError, match="--task=four_class and .*binary for --task=bacteria_vs_virus"):
        comparison.check_comparable(base, binary, "test")
    reordered = fake_run(tmp_path, "reordered", classes=CLASSES[::-1])
    with pytest.raises(rundir.RunError, match="reordered has"):
        comparison.check_comparable(base, reordered, "test")
    other_seed = fake_run(tmp_path, "other_seed", seed=1)
    comparison.check_comparable(base, other_seed, "test")  # TEST is the same for every seed
    with pytest.raises(rundir.RunError, match=r"--seed=0 vs 1.*--split=test"):
        comparison.check_comparable(base, other_seed, "val")


def test_the_result_is_written_as_json_and_markdown(two_runs_predictions, tmp_path):
    a, b, _ = two_runs_predictions
    result = comparison.compare_predictions(a, b, CLASSES, resamples=100)
    json_path, markdown_path = comparison.write_comparison(result, str(tmp_path / "a_vs_b"))
    with open(json_path) as handle:
        assert json.load(handle) == json.loads(json.dumps(result))
    with open(markdown_path) as handle:
        assert handle.read() == comparison.markdown(result)


@pytest.mark.slow  # a process of its own: ~10 s of imports, then two tiny evaluations
def test_the_command_compares_two_runs_end_to_end(tiny_dataset, tmp_path):
    runs = []
    for seed in (0, 1):
        run_dir = fake_run(tmp_path, f"tiny{seed}", seed=seed)
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Rescaling(1 / 255),
                                  keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(len(CLASSES), activation="softmax")])
        model.save(os.path.join(run_dir, rundir.MODEL))
        runs.append(run_dir)
    out = tmp_path / "compared"
    result = run_module("xray_tf.compare", *runs, f"--data_dir={tiny_dataset}", f"--out={out}", "--resamples=300",
                        "--batch_size=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| accuracy |" in result.stdout and "McNemar" in result.stdout
    with open(f"{out}.json") as handle:
        compared = json.load(handle)
    for run_dir in runs:  # each run was evaluated as xray-evaluate would
        written = pd.read_csv(os.path.join(run_dir, rundir.predictions_of_split("test")))
        assert compared["split"] == "test" and compared["num_images"] == len(written) > 0
    accuracies = [rundir.read_json(os.path.join(r, rundir.metrics_of_split("test")))["accuracy"] for r in runs]
    assert compared["metrics"]["accuracy"]["difference"] == pytest.approx(accuracies[0] - accuracies[1])
    refused = run_module("xray_tf.compare", runs[0], f"--data_dir={tiny_dataset}")
    assert refused.returncode != 0 and "exactly two run directories" in refused.stderr
