"""``xray-predict`` (``python -m xray_tf predict``): same numbers as ``model.predict``, every readable file predicted.

The run directory is built here with the artifacts a training run writes (``model.keras``,
``saved_model/``, ``classes.json``) from an untrained 32 px ResNet50: the CLI must reproduce the
model, whatever its quality, and training is tested in test_train_cli.
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

from xray_tf import decode, export, models, predict, rundir, synthetic

IMAGE_SIZE = 32
CLASSES = ["Normal", "Bacteria", "Virus", "COVID-19"]
PROBABILITY_COLUMNS = [f"p_{name}" for name in CLASSES]


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
    assert reasons[bad_folder[2][0]] == "Input is empty."
    assert "Unknown image file format" in reasons[bad_folder[2][1]]
    assert "JPEG" in reasons[bad_folder[2][2]]
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
    with Image.open(readable["gradcam"].iloc[0]) as overlay:
        assert overlay.mode == "RGB" and overlay.size == (48, 48)


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
def saved_model_predictor(run_dir) -> predict.Predictor:
    return predict.load_predictor(os.path.join(run_dir[0], "saved_model"))


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
def keras_predictor(run_dir) -> predict.Predictor:
    return predict.load_predictor(os.path.join(run_dir[0], "model.keras"))


def test_a_keras_file_alone_loads_with_its_run_classes(keras_predictor):
    assert keras_predictor.keras_model is not None and keras_predictor.class_names == CLASSES
    assert keras_predictor.image_size == IMAGE_SIZE


def test_gradcam_explains_the_class_asked_for(keras_predictor, bad_folder, tmp_path):
    results = predict.predict_files(keras_predictor, bad_folder[1], gradcam_dir=str(tmp_path), gradcam_class=3,
                                    overlay_size=40)
    assert [os.path.basename(result.gradcam) for result in results] == ["good.png", "good-2.png"]
    with pytest.raises(ValueError, match="gradcam_class=4 is no class index"):
        predict.predict_files(keras_predictor, bad_folder[1], gradcam_dir=str(tmp_path), gradcam_class=4)


def test_model_paths_that_are_no_model_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither a run directory"):
        predict.load_predictor(str(tmp_path))
    fake = tmp_path / "fake.keras"
    fake.write_text("not a zip")
    with pytest.raises(ValueError, match=f"{fake} cannot be loaded as a Keras model"):
        predict.load_predictor(str(fake))


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
