"""``xray_tf.evaluate`` (``xray-evaluate``) on a tiny trained run: numbers, figures, predictions, errors, real data."""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import run_module, shared_data
from fake_runs import make_run

from xray_tf import calibration, data, evaluate, export, layouts, metrics, models, plots, rundir
from xray_tf.config import ConfigError

pytestmark = pytest.mark.slow  # whole training runs in processes of their own

REPORT_KEYS = {"num_images", "accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "per_class",
               "confusion_matrix", "paper_metric", "split", "data_dir", "classes", "ci95", "calibration",
               "predicted_share", "absent_classes", "probabilities"}
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
    y_true = predictions["true_class"].map(classes.index).to_numpy()
    probabilities = predictions[[f"p_{metrics.metric_suffix(c)}" for c in classes]].to_numpy()
    assert (predictions["predicted_class"] == [classes[i] for i in probabilities.argmax(axis=1)]).all()
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
    for name in ("confusion_matrix_val.png", "roc_val.png", "pr_val.png", "reliability_val.png",
                 "confusion_matrix_test.png", "roc_test.png", "pr_test.png", "reliability_test.png"):
        path = os.path.join(run_dir, name)
        assert os.path.getsize(path) > 10_000, name
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    result = load(os.path.join(run_dir, "metrics_test.json"))
    figure = plots.confusion_matrix_figure(np.array(result["confusion_matrix"]), result["classes"], "t")
    assert len(figure.axes) == 2  # the matrix and its colour bar
    predictions = pd.read_csv(os.path.join(run_dir, "predictions_test.csv"))
    classes = result["classes"]
    curves = {c: metrics.roc_curve(predictions["true_class"] == c, predictions[f"p_{metrics.metric_suffix(c)}"])
              for c in classes}
    figure = plots.roc_figure(curves, result["per_class"], "t")
    assert len(figure.axes) == 1
    assert len(figure.axes[0].get_lines()) == len(classes) + 1  # every class is in the tiny test split, + chance


def _without_test_rows(dataset: str, out: str) -> str:
    """A copy of ``dataset``'s metadata with no TEST rows, sharing its images through a symlink."""
    os.makedirs(out)
    frame = pd.read_csv(os.path.join(dataset, layouts.METADATA_CSV), index_col=0)
    frame[frame["Dataset_type"] == "TRAIN"].to_csv(os.path.join(out, layouts.METADATA_CSV))
    os.symlink(os.path.join(dataset, layouts.IMAGE_FOLDER), os.path.join(out, layouts.IMAGE_FOLDER))
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
    with pytest.raises(data.DataError, match=r"2 image file\(s\) cannot be used") as error:
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


# A hand-made run around a tiny untrained (and over-confident) Keras model: calibration, operating
# points, ensembles and external data on it cost seconds, not a training run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dataset) -> str:
    root = tmp_path_factory.mktemp("tiny_runs")
    run = make_run(root, "tiny", 0, {}, flags={"data_dir": tiny_dataset, "val_fraction": "0.25"})
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, None), dtype="uint8", name="image")
    x = models.XrayPreprocessing("torch")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x))
    outputs = keras.layers.Dense(4, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 8))(x)
    keras.Model(inputs, outputs).save(os.path.join(run, rundir.MODEL))
    rundir.write_json(os.path.join(run, rundir.CLASSES), list(data.class_names_for("four_class")))
    return run


def _copy_run(run_dir: str, out) -> str:
    return str(shutil.copytree(run_dir, out))


def test_calibrate_and_operating_point_are_chosen_on_val_and_stored(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    model = models.load_model(os.path.join(run, rundir.MODEL))
    export.export_saved_model(model, os.path.join(run, rundir.SAVED_MODEL))
    point = "Bacteria:sensitivity=0.8"
    val = evaluate.evaluate_run(run, "val", calibrate=True, operating_points=[point])
    fitted = load(os.path.join(run, rundir.CALIBRATION))
    assert fitted["nll"]["after"] < fitted["nll"]["before"] and fitted["temperature"] > 1  # over-confident model
    # The run's SavedModel now serves the calibrated probabilities too.
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    serving = tf.saved_model.load(os.path.join(run, rundir.SAVED_MODEL)).signatures["serving_default"]
    (served,) = serving(tf.constant(images)).values()
    expected = calibration.apply_temperature(np.asarray(model.predict_on_batch(images)), fitted["temperature"])
    assert fitted["saved_model"] and np.allclose(served.numpy(), expected, atol=1e-6)
    assert val["probabilities"]["temperature"] == fitted["temperature"] and val["probabilities"]["calibrated"]
    chosen = val["operating_points"][point]
    assert chosen["rates"]["val"]["sensitivity"] >= 0.8 and "optimistic" in chosen["note"]
    assert load(os.path.join(run, rundir.OPERATING_POINTS))[point]["threshold"] == chosen["threshold"]
    predictions = pd.read_csv(os.path.join(run, "predictions_val.csv"))
    classes = list(data.class_names_for("four_class"))
    assert list(predictions.columns) == ["file", "true_class", "predicted_class",
                                         *[f"p_{metrics.metric_suffix(c)}" for c in classes], "patient",
                                         "flag_bacteria"]
    assert (predictions["flag_bacteria"] == (predictions["p_bacteria"] >= chosen["threshold"])).all()
    assert all(map(os.path.isfile, predictions["file"]))
    assert os.path.getsize(os.path.join(run, "reliability_val.png")) > 10_000
    assert os.path.getsize(os.path.join(run, "pr_val.png")) > 10_000

    # On test: the stored temperature is applied, the same threshold (chosen on val) is measured there.
    test = evaluate.evaluate_run(run, "test", operating_points=[point])
    assert test["probabilities"]["temperature"] == fitted["temperature"]
    assert test["operating_points"][point]["threshold"] == chosen["threshold"]
    rates = test["operating_points"][point]["rates"]["test"]
    assert rates["positives"] == test["per_class"]["Bacteria"]["support"] and rates["sensitivity_ci95"] is not None
    uncalibrated = evaluate.evaluate_run(run, "test", calibrated=False)
    assert uncalibrated["probabilities"]["temperature"] is None
    assert uncalibrated["accuracy"] == test["accuracy"]  # a temperature never changes the predicted class
    assert uncalibrated["calibration"]["nll"] != pytest.approx(test["calibration"]["nll"])
    with pytest.raises(ConfigError, match="^operating_point='Bacteria:specificity=0.9': a second operating point"):
        evaluate.evaluate_run(run, "test", operating_points=[point, "Bacteria:specificity=0.9"])


def test_an_ensemble_of_two_copies_of_a_run_equals_the_run(tiny_run, tmp_path):
    run_a, run_b = _copy_run(tiny_run, tmp_path / "a"), _copy_run(tiny_run, tmp_path / "b")
    single = evaluate.evaluate_run(run_a, "test", tta="flip")
    ensemble = evaluate.evaluate_run([run_a, run_b], "test", output_dir=str(tmp_path / "ensemble"), tta="flip")
    assert ensemble["run_dir"] is None and ensemble["probabilities"]["ensemble_of"] == [run_a, run_b]
    assert ensemble["confusion_matrix"] == single["confusion_matrix"]
    assert ensemble["macro_roc_auc"] == pytest.approx(single["macro_roc_auc"])
    assert set(ensemble["members"]) == {"a", "b"} and ensemble["members"]["b"]["accuracy"] == single["accuracy"]
    ours = pd.read_csv(tmp_path / "ensemble" / "predictions_test.csv")
    theirs = pd.read_csv(os.path.join(run_a, "predictions_test.csv"))
    pd.testing.assert_frame_equal(ours, theirs, atol=1e-6)

    with pytest.raises(ConfigError, match="^output_dir=None: several runs make an ensemble"):
        evaluate.evaluate_run([run_a, run_b], "test")
    with pytest.raises(ConfigError, match="is a run directory"):
        evaluate.evaluate_run([run_a, run_b], "test", output_dir=run_a)
    with open(os.path.join(run_b, rundir.FLAGS), "a") as handle:
        handle.write("--seed=1\n")
    with pytest.raises(ConfigError, match=r"^run_dir='.*b': its seed is 1 but .*a's is 0"):
        evaluate.evaluate_run([run_a, run_b], "val", output_dir=str(tmp_path / "ensemble"))
    with open(os.path.join(run_b, rundir.FLAGS), "a") as handle:
        handle.write("--image_size=64\n")
    with pytest.raises(ConfigError, match=r"^run_dir='.*b': its image_size is 64 but .*a's is 32"):
        evaluate.evaluate_run([run_a, run_b], "test", output_dir=str(tmp_path / "ensemble"))


def test_eval_data_reports_the_classes_it_lacks(tiny_run, tiny_dataset, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    folder = tmp_path / "hospital"
    (folder / "images").mkdir(parents=True)
    test = data.load_index(tiny_dataset).split("test")
    rows = test[test["label"].isin(["Normal", "Bacteria"])]
    for path in rows["path"]:
        shutil.copy(path, folder / "images")
    pd.DataFrame({"X_ray_image_name": rows["file"], "Label": rows["label"]}).to_csv(folder / "metadata.csv",
                                                                                   index=False)
    result = evaluate.evaluate_run(run, "eval", eval_data=str(folder))
    assert result["split"] == "eval" and result["data_dir"] == str(folder) and result["num_images"] == len(rows)
    assert result["absent_classes"] == ["Virus", "COVID-19"]
    assert result["per_class"]["Virus"]["recall"] is None and result["per_class"]["Normal"]["recall"] is not None
    assert sum(result["predicted_share"].values()) == pytest.approx(1.0)
    assert os.path.isfile(os.path.join(run, "metrics_eval.json")) and os.path.isfile(os.path.join(run,
                                                                                                 "reliability_eval.png"))
    with pytest.raises(ConfigError, match="^split='test': split 'eval' is the whole --eval_data folder"):
        evaluate.evaluate_run(run, "test", eval_data=str(folder))


def test_eval_data_in_a_folder_per_class_leaves_out_labels_the_run_lacks(tiny_run, tiny_dataset, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    test = data.load_index(tiny_dataset).split("test")
    for label, path in zip(test["label"].replace({"Virus": "Fungus"}), test["path"]):  # a class the run lacks
        os.makedirs(tmp_path / "hospital" / label, exist_ok=True)
        shutil.copy(path, tmp_path / "hospital" / label)
    result = evaluate.evaluate_run(run, "eval", eval_data=str(tmp_path / "hospital"))
    assert result["num_images"] == int((test["label"] != "Virus").sum())
    assert result["absent_classes"] == ["Virus"]


def test_command_line_ensemble_with_calibration_tta_and_an_operating_point(tiny_run, tmp_path):
    run_a, run_b = _copy_run(tiny_run, tmp_path / "a"), _copy_run(tiny_run, tmp_path / "b")
    out = tmp_path / "ensemble"
    result = run_module("xray_tf", "evaluate", f"--run_dir={run_a}", f"--run_dir={run_b}", f"--output_dir={out}",
                        "--split=val", "--calibrate", "--tta=flip", "--operating_point=Bacteria:sensitivity=0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Bacteria:sensitivity=0.8: threshold" in result.stdout and "member a: accuracy" in result.stdout
    report = load(out / "metrics_val.json")
    assert report["probabilities"]["tta"] == "flip" and len(report["probabilities"]["temperature"]) == 2
    assert os.path.isfile(os.path.join(run_a, rundir.CALIBRATION)) and os.path.isfile(os.path.join(run_b,
                                                                                                   rundir.CALIBRATION))
    refused = run_module("xray_tf", "evaluate", f"--run_dir={run_a}", f"--eval_data={tmp_path}", "--split=val")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == ("xray-evaluate: error: --split=val: --eval_data is evaluated "
                                                       "whole (as split eval); drop --split.")
