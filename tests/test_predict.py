"""``xray-predict`` (``python -m xray_tf predict``): same numbers as ``model.predict``, every readable file predicted.

The run directory is built here with the artifacts a training run writes (``model.keras``,
``saved_model/``, ``classes.json``) from an untrained 32 px ResNet50: the CLI must reproduce the
model, whatever its quality, and training is tested in test_train_cli. Test-time augmentation,
ensembles and operating-point flags use runs of tiny models (``tiny_runs``, made as in
test_predictors, where loading models is tested).
"""

from __future__ import annotations

import glob
import io
import os

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import run_module, shared_data
from PIL import Image
from test_predictors import CLASSES, IMAGE_SIZE, POINT, TEMPERATURE, _can_export, tiny_run

from xray_tf import calibration, decode, export, inference, models, predict, predictors, rundir, synthetic
from xray_tf.config import ConfigError

PROBABILITY_COLUMNS = ["p_normal", "p_bacteria", "p_virus", "p_covid_19"]  # metrics.metric_suffix of each


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[str, keras.Model]:
    run = tmp_path_factory.mktemp("predict") / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    model = models.build_model("resnet50", len(CLASSES), IMAGE_SIZE, weights="none", dropout=0.1)
    model.save(run / rundir.MODEL)
    rundir.write_json(str(run / rundir.CLASSES), CLASSES)
    export.export_saved_model(model, str(run / rundir.SAVED_MODEL))
    return str(run), model


def _xray(size: tuple[int, int], seed: int) -> np.ndarray:
    """A synthetic chest X-ray in [0, 1], squashed to ``size`` (width, height)."""
    image = synthetic.draw_xray(["Normal", "Bacteria", "Virus"][seed % 3], 64, np.random.default_rng(seed))
    return np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize(size))


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> tuple[str, list[str]]:
    """Nested folders of grey/RGB/RGBA/16-bit JPEG and PNG files of mixed sizes, plus files to skip."""
    root = tmp_path_factory.mktemp("tree") / "scans"
    for folder in ("ward_a/day_1", "ward_b"):
        (root / folder).mkdir(parents=True)
    grey = _xray((50, 70), 0)
    Image.fromarray(grey).save(root / "ward_a" / "chest.jpeg", quality=90)
    Image.fromarray(np.stack([_xray((64, 40), 1)] * 3, -1)).save(root / "ward_a" / "rgb.png")
    rgba = np.dstack([np.stack([_xray((45, 45), 2)] * 3, -1), np.full((45, 45), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "ward_a" / "day_1" / "rgba.png")
    Image.fromarray((_xray((80, 60), 3).astype(np.uint16) * 257)).save(root / "ward_a" / "day_1" / "deep.png")
    Image.fromarray(_xray((33, 90), 4)).save(root / "ward_b" / "chest.jpeg")  # same name, other folder
    Image.fromarray(_xray((40, 40), 5)).save(root / "ward_b" / "LOUD.JPG")
    (root / "ward_b" / "notes.txt").write_text("not searched for: no image extension")
    Image.fromarray(grey).save(root / "ward_b" / ".hidden.png")
    expected = [str(root / p) for p in ("ward_a/chest.jpeg", "ward_a/day_1/deep.png", "ward_a/day_1/rgba.png",
                                        "ward_a/rgb.png", "ward_b/LOUD.JPG", "ward_b/chest.jpeg")]
    return str(root), expected


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> tuple[str, list[str], list[str]]:
    """Two good files and three that cannot be read: empty, truncated JPEG, text named .png."""
    root = tmp_path_factory.mktemp("bad") / "inbox"
    root.mkdir()
    Image.fromarray(_xray((60, 60), 6)).save(root / "good.png")
    Image.fromarray(_xray((60, 60), 7)).save(root / "good.jpg", quality=90)
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes((root / "good.jpg").read_bytes()[:400])
    (root / "text.png").write_text("this is not a PNG\n")
    good = [str(root / "good.jpg"), str(root / "good.png")]
    bad = [str(root / name) for name in ("empty.png", "text.png", "truncated.jpg")]
    return str(root), good, bad


def model_predict(model: keras.Model, files: list[str]) -> np.ndarray:
    """``model.predict`` on the files decoded by the training input pipeline."""
    frame = pd.DataFrame({"path": files, "label_index": 0})
    images = decode.decoded_dataset(frame, IMAGE_SIZE).map(lambda image, _: image)
    return model.predict(images.batch(4), verbose=0)


@pytest.fixture(scope="module")
def cli_run(run_dir, image_tree, bad_folder, tmp_path_factory):
    """One CLI call over the tree and the bad folder, with Grad-CAM overlays; returns (process, CSV, cams)."""
    out = tmp_path_factory.mktemp("cli")
    result = run_module("xray_tf", "predict", f"--model={run_dir[0]}", image_tree[0], bad_folder[0],
                        f"--gradcam_dir={out / 'cams'}", f"--output={out / 'predictions.csv'}",
                        "--overlay_size=48", "--batch_size=4")
    frame = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    return result, frame, str(out / "cams")


@pytest.mark.slow
def test_cli_predictions_equal_model_predict(cli_run, run_dir, image_tree, bad_folder):
    _, frame, _ = cli_run
    files = image_tree[1] + bad_folder[1]
    rows = frame.set_index("file").loc[files]
    expected = model_predict(run_dir[1], files)
    assert np.ptp(expected, axis=0).max() > 1e-4, "the images should not all get the same probabilities"
    np.testing.assert_allclose(rows[PROBABILITY_COLUMNS].to_numpy(float), expected, atol=2e-6)
    assert rows["predicted_class"].tolist() == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert (rows["error"] == "").all()


@pytest.mark.slow
def test_cli_searches_folders_recursively_for_images_only(cli_run, image_tree, bad_folder):
    _, frame, _ = cli_run
    assert frame["file"].tolist() == image_tree[1] + sorted(bad_folder[1] + bad_folder[2])


@pytest.mark.slow
def test_cli_reports_unreadable_files_and_exits_1(cli_run, bad_folder):
    result, frame, _ = cli_run
    assert result.returncode == 1, result.stderr[-3000:]
    failed = frame[frame["error"] != ""]
    assert sorted(failed["file"]) == bad_folder[2]
    assert (failed[["predicted_class", *PROBABILITY_COLUMNS]] == "").all(axis=None)
    assert "8 of 11 files predicted; 3 could not be read:" in result.stderr
    reasons = dict(zip(failed["file"], failed["error"]))
    # Training's words (decode.explain_failure), not TensorFlow's.
    assert reasons[bad_folder[2][0]] == "empty file (0 bytes)"
    assert reasons[bad_folder[2][1]] == "not an image but text starting 'this is not a PNG\\n'"
    assert reasons[bad_folder[2][2]].startswith("JPEG file that does not decode (corrupt or truncated?)")
    for path, reason in reasons.items():
        assert f"  {path}: {reason}\n" in result.stderr


@pytest.mark.slow
def test_cli_writes_one_overlay_per_readable_image(cli_run):
    _, frame, cams = cli_run
    readable = frame[frame["error"] == ""]
    assert frame.loc[frame["error"] != "", "gradcam"].eq("").all()
    assert sorted(glob.glob(os.path.join(cams, "*.png"))) == sorted(readable["gradcam"])
    assert os.path.basename(readable["gradcam"].iloc[0]) == "chest.png"  # named after the input file
    assert os.path.basename(readable["gradcam"].iloc[5]) == "chest-2.png"  # and unique
    with Image.open(readable["gradcam"].iloc[0]) as overlay:  # labelled: a caption above, a colour bar beside
        assert overlay.mode == "RGB" and overlay.size[0] > 48 and overlay.size[1] > 48


@pytest.mark.slow
def test_cli_writes_csv_to_stdout_and_exits_0_when_all_read(run_dir, bad_folder):
    good = bad_folder[1]
    result = run_module("xray_tf.cli.predict", f"--model={run_dir[0]}/saved_model", *good)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "file,predicted_class," + ",".join(PROBABILITY_COLUMNS) + ",error"
    assert [line.split(",")[0] for line in lines[1:]] == good


@pytest.mark.slow
def test_cli_on_jax_predicts_like_tensorflow_and_keeps_its_compiled_programs(run_dir, bad_folder, tmp_path):
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    good, cache = bad_folder[1], tmp_path / "xla"
    result = run_module("xray_tf", "predict", f"--model={run_dir[0]}", f"--compilation_cache={cache}", *good,
                        env={"KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(io.StringIO(result.stdout)).set_index("file").loc[good]
    np.testing.assert_allclose(frame[PROBABILITY_COLUMNS].to_numpy(float), model_predict(run_dir[1], good),
                               atol=1e-4)
    assert any(name.startswith("jit_predict_step") for name in os.listdir(cache))


@pytest.fixture(scope="module")
def saved_model_predictor(run_dir) -> predictors.Predictor:
    return predictors.load_predictor(os.path.join(run_dir[0], "saved_model"))


def test_saved_model_alone_predicts_like_the_keras_model(saved_model_predictor, run_dir, image_tree):
    predictor = saved_model_predictor
    assert predictor.keras_model is None and predictor.image_size == IMAGE_SIZE
    assert predictor.class_names == CLASSES  # from the run directory around it
    results = predict.predict_files(predictor, image_tree[1], batch_size=4)
    probabilities = np.stack([result.probabilities for result in results])
    np.testing.assert_allclose(probabilities, model_predict(run_dir[1], image_tree[1]), atol=2e-6)


def test_gradcam_with_a_bare_saved_model_is_refused(saved_model_predictor, image_tree, tmp_path):
    with pytest.raises(ValueError, match="Grad-CAM needs the Keras model"):
        predict.predict_files(saved_model_predictor, image_tree[1], gradcam_dir=str(tmp_path / "cams"))
    assert not os.path.exists(tmp_path / "cams")


@pytest.fixture(scope="module")
def keras_predictor(run_dir) -> predictors.Predictor:
    return predictors.load_predictor(os.path.join(run_dir[0], "model.keras"))


def test_gradcam_explains_the_class_asked_for(keras_predictor, bad_folder, tmp_path):
    results = predict.predict_files(keras_predictor, bad_folder[1], gradcam_dir=str(tmp_path), gradcam_class=3,
                                    overlay_size=40)
    assert [os.path.basename(result.gradcam) for result in results] == ["good.png", "good-2.png"]
    with Image.open(results[0].gradcam) as overlay:  # gradcam.annotated_overlay: the 40 px picture and its labels
        assert overlay.size[0] > 40 and overlay.size[1] > 40
    with pytest.raises(ValueError, match="gradcam_class=4 is no class index"):
        predict.predict_files(keras_predictor, bad_folder[1], gradcam_dir=str(tmp_path), gradcam_class=4)


def test_missing_paths_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png: no such file"):
        predict.find_images([str(tmp_path / "nowhere.png")])
    with pytest.raises(ValueError, match="No image files"):
        predict.find_images([str(tmp_path)])


def test_real_full_resolution_files(keras_predictor, run_dir):
    """40 originals: grey and RGB JPEG and PNG, 440 to 2500 px."""
    files = predict.find_images([os.path.join(shared_data("fullres"), "images")])
    assert len(files) == 40
    results = predict.predict_files(keras_predictor, files, batch_size=16)
    assert [result.error for result in results] == [None] * 40
    probabilities = np.stack([result.probabilities for result in results])
    np.testing.assert_allclose(probabilities, model_predict(run_dir[1], files), atol=2e-6)


def test_csv_columns_use_the_metric_spelling_of_each_class():
    """The spelling evaluate's predictions CSV shares: p_<metrics.metric_suffix(class)>, flag_<...> per operating
    point; empty cells for a failure."""
    predictions = [predict.Prediction("a.png", np.array([0.1, 0.2, 0.3, 0.4]), gradcam="cams/a.png"),
                   predict.Prediction("b.png", error="is a FIFO (named pipe)"),
                   predict.Prediction("c.png", np.array([0.7, 0.1, 0.1, 0.1]), gradcam="cams/c.png")]
    lines = predict.to_csv(predictions, CLASSES, with_gradcam=True, thresholds={"COVID-19": 0.35}).splitlines()
    assert lines == ["file,predicted_class," + ",".join(PROBABILITY_COLUMNS) + ",flag_covid_19,gradcam,error",
                     "a.png,COVID-19,0.1,0.2,0.3,0.4,1,cams/a.png,", "b.png,,,,,,,,is a FIFO (named pipe)",
                     "c.png,Normal,0.7,0.1,0.1,0.1,0,cams/c.png,"]
    evaluated = inference.predictions_table(["a.png"], np.array([[0.1, 0.2, 0.3, 0.4]]), CLASSES, ["Virus"],
                                            thresholds={"COVID-19": 0.35})
    assert [column for column in evaluated.columns if column != "true_class"] == lines[0].split(",")[:-2]


# ---------------------------------------------------------------------------------------------
# Test-time augmentation, ensembles and operating points, on runs of tiny models


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, str]:
    """Runs a and b (two models), and a run calibrated with TEMPERATURE."""
    root = tmp_path_factory.mktemp("tiny_runs")
    return {"a": tiny_run(root, "a", 0), "b": tiny_run(root, "b", 1),
            "calibrated": tiny_run(root, "calibrated", 2, temperature=TEMPERATURE)}


def _probabilities(predictor, files: list[str], **kwargs) -> np.ndarray:
    return np.stack([result.probabilities for result in predict.predict_files(predictor, files, batch_size=3,
                                                                              **kwargs)])


@pytest.fixture(scope="module")
def scans(image_tree, bad_folder) -> list[str]:
    return image_tree[1] + bad_folder[1]


@pytest.fixture(scope="module")
def plain(tiny_runs, scans) -> np.ndarray:
    """Run a's own probabilities of the scans."""
    return _probabilities(predictors.load_predictor(tiny_runs["a"]), scans)


def test_an_ensemble_predicts_the_mean_of_its_members(tiny_runs, scans, plain):
    a, b = predictors.load_predictor(tiny_runs["a"]), predictors.load_predictor(tiny_runs["b"])
    other = _probabilities(b, scans)
    assert np.abs(other - plain).max() > 1e-3 and np.ptp(plain, axis=0).max() > 1e-4
    ensemble = predictors.load_ensemble([tiny_runs["a"], tiny_runs["b"]])
    np.testing.assert_allclose(_probabilities(ensemble, scans), (plain + other) / 2, atol=1e-7)
    np.testing.assert_allclose(_probabilities([a, a], scans), plain, atol=1e-7)  # two copies: that model


def test_flip_on_a_flip_invariant_model_equals_no_tta(tiny_runs, scans, plain):
    a = predictors.load_predictor(tiny_runs["a"])
    np.testing.assert_allclose(_probabilities(a, scans, tta="flip"), plain, atol=1e-6)
    # The rotated views' black corners enter the mean over pixels: flip_rotate does reach the model.
    assert np.abs(_probabilities(a, scans, tta="flip_rotate") - plain).max() > 1e-5


def test_a_runs_temperature_scales_the_predictions(tiny_runs, scans):
    run = tiny_runs["calibrated"]
    own = _probabilities(predictors.load_predictor(run, calibrated=False), scans)
    np.testing.assert_allclose(_probabilities(predictors.load_predictor(run), scans),
                               calibration.apply_temperature(own, TEMPERATURE), atol=1e-7)


@pytest.fixture(scope="module")
def stored_point(tiny_runs, scans) -> tuple[list[predict.Prediction], float]:
    """The calibrated run's predictions with --tta=flip, and the threshold for POINT stored in it: their median
    p_covid_19, so that some images are flagged and some not."""
    results = predict.predict_files(predictors.load_predictor(tiny_runs["calibrated"]), scans, tta="flip")
    threshold = float(np.median([result.probabilities[3] for result in results]))
    calibration.write_operating_points(tiny_runs["calibrated"], {POINT: {
        "class": "COVID-19", "threshold": threshold, "temperature": TEMPERATURE, "tta": "flip"}})
    return results, threshold


def test_an_operating_point_flags_the_images_at_or_above_its_stored_threshold(tiny_runs, scans, stored_point):
    results, threshold = stored_point
    covid = np.array([result.probabilities[3] for result in results])
    thresholds = predictors.operating_thresholds([predictors.load_predictor(tiny_runs["calibrated"])], [POINT],
                                                 "flip")
    frame = pd.read_csv(io.StringIO(predict.to_csv(results, CLASSES, thresholds=thresholds)))
    assert frame["flag_covid_19"].tolist() == (covid >= threshold).astype(int).tolist()
    assert 0 < frame["flag_covid_19"].sum() < len(scans)


def test_gradcam_of_an_ensemble_is_refused_before_anything_is_written(tiny_runs, scans, tmp_path):
    a = predictors.load_predictor(tiny_runs["a"])
    with pytest.raises(ConfigError, match="Grad-CAM explains one model, not an ensemble of 2"):
        predict.predict_batches([a, a], scans, gradcam_dir=str(tmp_path / "cams"))
    assert not os.path.exists(tmp_path / "cams")


@pytest.mark.slow
def test_cli_applies_the_temperature_tta_and_operating_point(tiny_runs, scans, stored_point):
    (expected, threshold), run = stored_point, tiny_runs["calibrated"]
    result = run_module("xray_tf", "predict", f"--model={run}", f"--operating_point={POINT}", "--tta=flip", *scans)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"probabilities with the run's temperature {TEMPERATURE:g}" in result.stderr
    frame = pd.read_csv(io.StringIO(result.stdout)).set_index("file").loc[scans]
    np.testing.assert_allclose(frame[PROBABILITY_COLUMNS].to_numpy(float),
                               np.stack([r.probabilities for r in expected]), atol=2e-6)
    assert frame["flag_covid_19"].tolist() == [int(r.probabilities[3] >= threshold) for r in expected]


@pytest.fixture(scope="module")
def exported_a(tiny_runs) -> dict[str, str]:
    """Run a's model as ONNX and LiteRT files in the run (those this machine can convert and run)."""
    formats = [name for name in ("onnx", "litert") if _can_export(name)]
    return dict(zip(formats, export.export_run(tiny_runs["a"], formats)))


@pytest.mark.slow
@pytest.mark.parametrize("format_name", ["onnx", "litert"])
def test_cli_predicts_with_an_onnx_or_litert_file_as_with_the_keras_model(exported_a, scans, plain, format_name):
    if format_name not in exported_a:
        pytest.skip(f"this machine cannot export or run {format_name}: {export.INSTALL}")
    result = run_module("xray_tf", "predict", f"--model={exported_a[format_name]}", *scans)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(io.StringIO(result.stdout)).set_index("file").loc[scans]
    np.testing.assert_allclose(frame[PROBABILITY_COLUMNS].to_numpy(float), plain, atol=1e-5)
    assert frame["predicted_class"].tolist() == [CLASSES[i] for i in plain.argmax(axis=1)]


@pytest.mark.slow
def test_gradcam_with_an_exported_file_is_refused(exported_a, scans, tmp_path):
    if not exported_a:
        pytest.skip(f"this machine can neither export nor run ONNX or LiteRT: {export.INSTALL}")
    path = next(iter(exported_a.values()))
    with pytest.raises(ValueError, match=f"Grad-CAM needs the Keras model .* not {path}: a SavedModel, ONNX or "
                                         "LiteRT export has no layers to explain"):
        predict.predict_files(predictors.load_predictor(path), scans, gradcam_dir=str(tmp_path / "cams"))
    assert not os.path.exists(tmp_path / "cams")
