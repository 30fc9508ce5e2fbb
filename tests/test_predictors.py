"""``predictors``: a run directory, a SavedModel or a ``.keras`` file loaded as one kind of ``Predictor``.

The runs hold tiny models (a 1x1 convolution, then the mean over pixels), with the files
``xray-evaluate`` would have stored in them written by hand; the probabilities are checked on a
batch of uint8 arrays, since decoding files is ``predict``'s part (tests/test_predict.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

from xray_tf import calibration, export, inference, models, predictors, rundir
from xray_tf.config import ConfigError
from xray_tf.rundir import RunError

IMAGE_SIZE = 32
CLASSES = ["Normal", "Bacteria", "Virus", "COVID-19"]
TEMPERATURE = 2.5
POINT = "COVID-19:sensitivity=0.9"


def tiny_run(root, name: str, seed: int, size: int = IMAGE_SIZE, classes: list[str] = CLASSES, named: bool = True,
             temperature: float | None = None, saved_model: bool = False) -> str:
    """A run directory holding a tiny flip-invariant model (a 1x1 convolution, then the mean over pixels) and, if
    ``named``, its ``classes.json``; with ``saved_model``, its ``saved_model/``; with ``temperature``, calibrated
    as ``xray-evaluate --calibrate`` leaves a run (the SavedModel exported with that temperature)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((size, size, 1), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 1, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(len(classes), activation="softmax")], name=name)
    run = root / name
    run.mkdir()
    model.save(run / rundir.MODEL)
    if named:
        rundir.write_json(str(run / rundir.CLASSES), classes)
    if saved_model:
        export.export_saved_model(model, str(run / rundir.SAVED_MODEL), temperature)
    if temperature is not None:
        calibration.write_calibration(str(run), {"temperature": temperature, "saved_model": saved_model})
    return str(run)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, str]:
    """Run a; a run calibrated with TEMPERATURE (its SavedModel too) whose threshold for POINT is stored, chosen
    with --tta=flip; and two runs that cannot join a's ensemble: 40 px, and two classes."""
    root = tmp_path_factory.mktemp("tiny_runs")
    runs = {"a": tiny_run(root, "a", 0), "40px": tiny_run(root, "40px", 0, size=40),
            "two_classes": tiny_run(root, "two", 0, classes=CLASSES[:2]),
            "calibrated": tiny_run(root, "calibrated", 1, temperature=TEMPERATURE, saved_model=True)}
    calibration.write_operating_points(runs["calibrated"], {POINT: {
        "class": "COVID-19", "threshold": 0.3, "temperature": TEMPERATURE, "tta": "flip"}})
    return runs


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Six uint8 images of rising brightness, so that the tiny models give each other probabilities."""
    rng = np.random.default_rng(0)
    brightness = np.linspace(0.1, 1.0, 6)[:, None, None, None]
    return (255 * brightness * rng.uniform(size=(6, IMAGE_SIZE, IMAGE_SIZE, 1))).astype(np.uint8)


def _probabilities(predictor: predictors.Predictor, images: np.ndarray) -> np.ndarray:
    """What prediction makes of the predictor: its member's probabilities, the temperature applied unless built in."""
    return inference.ensemble_probabilities([predictor.member()], [images], len(images))


def test_a_keras_file_alone_loads_with_its_run_classes(tiny_runs):
    path = os.path.join(tiny_runs["a"], rundir.MODEL)
    predictor = predictors.load_predictor(path)
    assert predictor.keras_model is not None and predictor.class_names == CLASSES
    assert predictor.image_size == IMAGE_SIZE and predictor.name == path and predictor.run_dir == tiny_runs["a"]
    assert predictor.temperature is None  # an uncalibrated run: the model's own probabilities


def test_classes_are_named_by_index_without_classes_json_and_a_wrong_one_is_refused(tmp_path, caplog):
    run = tiny_run(tmp_path, "unnamed", 0, named=False)
    assert predictors.load_predictor(run).class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert "No classes.json beside the model" in caplog.text
    rundir.write_json(os.path.join(run, rundir.CLASSES), CLASSES[:3])
    with pytest.raises(ValueError, match="classes.json must list 4 class names"):
        predictors.load_predictor(run)


def test_model_paths_that_are_no_model_are_named(tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory"):
        predictors.load_predictor(str(tmp_path))
    fake = tmp_path / "fake.keras"
    fake.write_text("not a zip")
    # models.load_model's refusal: the file, and what is wrong with it.
    with pytest.raises(RunError, match=f"^{fake}: not a zip archive, as a .keras model file is"):
        predictors.load_predictor(str(fake))


def test_a_runs_temperature_scales_its_probabilities_unless_calibrated_is_false(tiny_runs, images):
    run = tiny_runs["calibrated"]
    own = predictors.load_predictor(run, calibrated=False)
    assert own.temperature is None
    plain = _probabilities(own, images)
    calibrated = predictors.load_predictor(run)
    assert calibrated.temperature == TEMPERATURE and not calibrated.temperature_built_in
    scaled = _probabilities(calibrated, images)
    assert np.abs(scaled - plain).max() > 1e-3 and np.ptp(plain, axis=0).max() > 1e-4
    np.testing.assert_allclose(scaled, calibration.apply_temperature(plain, TEMPERATURE), atol=1e-7)
    saved_model = predictors.load_predictor(os.path.join(run, rundir.SAVED_MODEL))
    assert saved_model.keras_model is None and saved_model.image_size == IMAGE_SIZE
    assert saved_model.class_names == CLASSES  # from the run directory around it
    assert saved_model.temperature == TEMPERATURE and saved_model.temperature_built_in  # applied once, by the graph
    np.testing.assert_allclose(_probabilities(saved_model, images), scaled, atol=1e-5)
    with pytest.raises(ConfigError, match="built in, which cannot be taken out") as refused:
        predictors.load_predictor(os.path.join(run, rundir.SAVED_MODEL), calibrated=False)
    assert refused.value.field == "calibrated"


@pytest.mark.parametrize("other, differs", [("40px", "its image_size is 40 but"), ("two_classes", "its classes is")])
def test_members_that_differ_are_named(tiny_runs, other, differs):
    with pytest.raises(ConfigError, match=differs) as refused:
        predictors.load_ensemble([tiny_runs["a"], tiny_runs[other]])
    assert refused.value.field == "model" and refused.value.value == os.path.join(tiny_runs[other], rundir.MODEL)
    with pytest.raises(ConfigError, match="name at least one model"):
        predictors.load_ensemble([])


def test_operating_thresholds_are_the_stored_ones_for_the_same_probabilities(tiny_runs):
    run = tiny_runs["calibrated"]
    predictor = predictors.load_predictor(run)
    assert predictors.operating_thresholds([predictor], ["covid_19:sensitivity=0.9"], "flip") == {"COVID-19": 0.3}
    assert predictors.operating_thresholds([predictor, predictor], [], "flip") == {}
    # Chosen for the run's calibrated probabilities with flip: other probabilities are refused.
    with pytest.raises(ConfigError, match="chosen with temperature 2.5 and --tta=flip"):
        predictors.operating_thresholds([predictor], [POINT], "none")
    with pytest.raises(ConfigError, match="not temperature None"):
        predictors.operating_thresholds([predictors.load_predictor(run, calibrated=False)], [POINT], "flip")
    with pytest.raises(ConfigError, match="an ensemble of 2 models has no stored threshold"):
        predictors.operating_thresholds([predictor, predictor], [POINT], "flip")
    with pytest.raises(ConfigError, match="a second operating point for COVID-19"):
        predictors.operating_thresholds([predictor], [POINT, "COVID-19:specificity=0.5"], "flip")
    with pytest.raises(ConfigError, match="no threshold stored in"):
        predictors.operating_thresholds([predictors.load_predictor(tiny_runs["a"])], [POINT], "flip")


EXPORTED = ["onnx", "litert"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    """Exports of two tiny runs: ``plain`` has its files in ``exports/`` below the run (classes.json above
    them), ``calibrated`` (TEMPERATURE) in the run directory itself, as xray-export writes them."""
    root = tmp_path_factory.mktemp("exported")
    runs = {"plain": tiny_run(root, "plain", 0), "calibrated": tiny_run(root, "calibrated", 1, temperature=TEMPERATURE)}
    formats = [name for name in EXPORTED if _can_export(name)]
    export.export_model(models.load_model(os.path.join(runs["plain"], rundir.MODEL)),
                        os.path.join(runs["plain"], "exports"), formats)
    export.export_run(runs["calibrated"], formats)
    return runs


def _can_export(format_name: str) -> bool:
    try:
        export.check_formats([format_name])
    except export.ExportError:
        return False
    return format_name != "onnx" or importlib.util.find_spec("onnxruntime") is not None


def _exported_path(run: str, format_name: str) -> str:
    if not _can_export(format_name):
        pytest.skip(f"this machine cannot export or run {format_name}: {export.INSTALL}")
    return os.path.join(run, rundir.EXPORTS[format_name])


@pytest.mark.slow
@pytest.mark.parametrize("format_name", EXPORTED)
def test_an_onnx_or_litert_file_predicts_like_the_keras_model_with_the_runs_classes(exported, images, format_name):
    run = exported["plain"]
    path = _exported_path(os.path.join(run, "exports"), format_name)
    predictor = predictors.load_predictor(path)
    assert predictor.keras_model is None and predictor.name == path
    assert predictor.class_names == CLASSES and predictor.run_dir == run  # classes.json in the folder above
    assert predictor.image_size == IMAGE_SIZE and predictor.temperature is None
    keras_predictor = predictors.load_predictor(run)
    np.testing.assert_allclose(_probabilities(predictor, images), _probabilities(keras_predictor, images), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("format_name", EXPORTED)
def test_an_export_of_a_calibrated_run_has_its_temperature_built_in(exported, images, format_name):
    run = exported["calibrated"]
    predictor = predictors.load_predictor(_exported_path(run, format_name))
    assert predictor.run_dir == run and predictor.temperature == TEMPERATURE and predictor.temperature_built_in
    plain = _probabilities(predictors.load_predictor(run, calibrated=False), images)
    np.testing.assert_allclose(_probabilities(predictor, images), calibration.apply_temperature(plain, TEMPERATURE),
                               atol=1e-5)
    with pytest.raises(ConfigError, match="built in, which cannot be taken out"):
        predictors.load_predictor(_exported_path(run, format_name), calibrated=False)


def test_an_onnx_file_without_onnxruntime_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / rundir.ONNX
    path.write_bytes(b"not read: the runtime is missing first")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ConfigError, match=r"needs onnxruntime, not installed: pip install 'xray_tf\[export\]'") as no:
        predictors.load_predictor(str(path))
    assert no.value.field == "model"


def test_a_file_that_is_no_onnx_or_litert_model_is_named(tmp_path):
    for name, runtime in ((rundir.ONNX, "ONNX Runtime"), (rundir.TFLITE, "the LiteRT interpreter")):
        if name == rundir.ONNX:
            pytest.importorskip("onnxruntime", reason=f"ONNX Runtime reads the file ({export.INSTALL})")
        path = tmp_path / name
        path.write_text("not a model")
        with pytest.raises(ValueError, match=f"^{path}: cannot be loaded by {runtime}"):
            predictors.load_predictor(str(path))
