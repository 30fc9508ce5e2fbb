"""``xray_tf.evaluate`` (``xray-evaluate``) on a tiny trained run: numbers, figures, predictions, errors, real data."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data

from xray_tf import data, evaluate, metrics, plots, rundir
from xray_tf.config import ConfigError

pytestmark = pytest.mark.slow  # whole training runs in processes of their own

REPORT_KEYS = {"num_images", "accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "per_class",
               "confusion_matrix", "paper_metric", "split", "data_dir", "classes"}
PER_CLASS_KEYS = {"support", "precision", "recall", "specificity", "f1", "roc_auc"}


@pytest.fixture(scope="module")
def run_dir(paper_results) -> str:
    return os.path.join(paper_results, "prce_seed0")


def load(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


@pytest.mark.parametrize("split", ["val", "test"])
def test_metrics_file_agrees_with_training_and_predictions(run_dir, split):
    result = load(os.path.join(run_dir, f"metrics_{split}.json"))
    assert REPORT_KEYS <= set(result)
    assert all(PER_CLASS_KEYS <= set(stats) for stats in result["per_class"].values())
    # The same model on the same images as the training's own evaluation: the same numbers.
    training = load(os.path.join(run_dir, "metrics.json"))["splits"][split]
    assert result["confusion_matrix"] == training["confusion_matrix"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert result[key] == pytest.approx(training[key])
    assert result["macro_roc_auc"] == pytest.approx(training["macro_roc_auc"], abs=1e-6)
    # Every number can be recomputed from predictions_<split>.csv.
    predictions = pd.read_csv(os.path.join(run_dir, f"predictions_{split}.csv"))
    classes = result["classes"]
    y_true = predictions["label"].map(classes.index).to_numpy()
    probabilities = predictions[[f"p_{metrics.metric_suffix(c)}" for c in classes]].to_numpy()
    assert (predictions["predicted"] == [classes[i] for i in probabilities.argmax(axis=1)]).all()
    matrix = metrics.confusion_matrix(y_true, probabilities.argmax(axis=1), len(classes))
    recomputed = metrics.classification_report(matrix, classes, y_true, probabilities)
    for name in classes:
        for key in PER_CLASS_KEYS:
            expected = recomputed["per_class"][name][key]
            assert result["per_class"][name][key] == (None if expected is None else pytest.approx(expected))


def test_paper_metric_is_the_mean_of_history(run_dir):
    paper = load(os.path.join(run_dir, "metrics_val.json"))["paper_metric"]
    history = pd.read_csv(os.path.join(run_dir, "history.csv"))
    assert paper["name"] == "average accuracy over epochs" and "not the accuracy" in paper["note"]
    assert paper["epochs"] == 2
    assert paper["train"] == pytest.approx(history["accuracy"].mean())
    assert paper["val"] == pytest.approx(history["val_accuracy"].mean())


def test_figures_are_written_with_their_axes_and_lines(run_dir):
    for name in ("confusion_matrix_val.png", "roc_val.png", "confusion_matrix_test.png", "roc_test.png"):
        path = os.path.join(run_dir, name)
        assert os.path.getsize(path) > 10_000, name
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    result = load(os.path.join(run_dir, "metrics_test.json"))
    figure = plots.confusion_matrix_figure(np.array(result["confusion_matrix"]), result["classes"], "t")
    assert len(figure.axes) == 2  # the matrix and its colour bar
    predictions = pd.read_csv(os.path.join(run_dir, "predictions_test.csv"))
    classes = result["classes"]
    curves = {c: metrics.roc_curve(predictions["label"] == c, predictions[f"p_{metrics.metric_suffix(c)}"])
              for c in classes}
    figure = plots.roc_figure(curves, result["per_class"], "t")
    assert len(figure.axes) == 1
    assert len(figure.axes[0].get_lines()) == len(classes) + 1  # every class is in the tiny test split, + chance


def _without_test_rows(dataset: str, out: str) -> str:
    """A copy of ``dataset``'s metadata with no TEST rows, sharing its images through a symlink."""
    os.makedirs(out)
    frame = pd.read_csv(os.path.join(dataset, data.METADATA_CSV), index_col=0)
    frame[frame["Dataset_type"] == "TRAIN"].to_csv(os.path.join(out, data.METADATA_CSV))
    os.symlink(os.path.join(dataset, data.IMAGE_FOLDER), os.path.join(out, data.IMAGE_FOLDER))
    return out


def test_missing_test_split_is_one_clear_error(run_dir, tiny_dataset, tmp_path):
    no_test = _without_test_rows(tiny_dataset, str(tmp_path / "no_test"))
    with pytest.raises(ConfigError, match=r"^split='test': .*has no test images.*evaluate the val split"):
        evaluate.evaluate_run(run_dir, "test", no_test)


def test_unreadable_images_are_all_named_before_any_prediction(run_dir, tiny_dataset, tmp_path):
    copy = shutil.copytree(tiny_dataset, tmp_path / "broken")
    test_paths = data.load_index(str(copy)).split("test")["path"].tolist()
    for path in test_paths[:2]:
        with open(path, "wb") as handle:
            handle.write(b"<html>not an image</html>")
    with pytest.raises(data.DataError, match=r"2 image file\(s\) cannot be decoded") as error:
        evaluate.evaluate_run(run_dir, "test", str(copy))
    assert all(path in str(error.value) for path in test_paths[:2])


def test_run_without_model_is_one_clear_error(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (rundir.FLAGS, rundir.CLASSES, rundir.METRICS, rundir.HISTORY):
        shutil.copy(os.path.join(run_dir, name), copy / name)
    with pytest.raises(rundir.RunError, match=r"model\.keras: no such file"):
        evaluate.evaluate_run(str(copy), "val")
    with pytest.raises(ConfigError, match="^split='train': not one of"):
        evaluate.evaluate_run(str(copy), "train")
    with pytest.raises(ConfigError, match="^run_dir='.*nothing': not a directory"):
        evaluate.evaluate_run(str(tmp_path / "nothing"), "val")


def test_evaluates_on_the_real_validation_split(run_dir, tmp_path):
    """The synthetic-trained tiny model on the shared CoronaHack copy: the command works on real files."""
    coronahack = shared_data("coronahack")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("saved_model", "model.keras", "*.png", "metrics_*",
                                                                 "predictions_*"))
    os.symlink(os.path.join(run_dir, "model.keras"), copy / "model.keras")
    result = evaluate.evaluate_run(str(copy), "val", coronahack, batch_size=64)
    index = data.load_index(coronahack, "four_class", 0.1, 0)
    assert result["num_images"] == len(index.split("val"))
    assert {name: stats["support"] for name, stats in result["per_class"].items()} == index.class_counts("val")
    assert os.path.getsize(copy / "roc_val.png") > 0
    with pytest.raises(ConfigError, match="^split='test': .*no test images"):
        evaluate.evaluate_run(str(copy), "test", coronahack)
