"""The exports: uint8 images in, the probabilities xray-evaluate reports out, temperature included.

The SavedModel is served by TensorFlow here; the ONNX and LiteRT files of a small trained model are
each run in a fresh process by their own runtime, which must not need xray_tf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_module, run_under_jax

from xray_tf import calibration, export, models, rundir
from xray_tf.config import ConfigError, export_formats

SIZE = 32
CLASSES = ["Normal", "Bacteria", "Virus", "COVID-19"]
TEMPERATURE = 2.0

# Each runtime in a process of its own: argv is the model file, the images (.npy) and where the
# probabilities go (.npy); xray_tf must not have been imported on the way.
ONNX_PROGRAM = """
import sys, numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[2])})[0])
assert "xray_tf" not in sys.modules
"""
LITERT_PROGRAM = """
import sys, numpy as np
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tensorflow.lite import Interpreter
images = np.load(sys.argv[2])
interpreter = Interpreter(model_path=sys.argv[1])
(image,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
interpreter.resize_tensor_input(image["index"], images.shape)
interpreter.allocate_tensors()
interpreter.set_tensor(image["index"], images)
interpreter.invoke()
np.save(sys.argv[3], interpreter.get_tensor(output["index"]))
assert "xray_tf" not in sys.modules
"""
RUNTIMES = {"onnx": ("onnxruntime", ONNX_PROGRAM), "litert": (None, LITERT_PROGRAM)}


def _images(channels: int = 1, count: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, channels), dtype=np.uint8)


def _needs(format_name: str) -> None:
    """Skip unless this machine can convert ``format_name`` and run the result."""
    try:
        export.check_formats([format_name])
    except export.ExportError as error:
        pytest.skip(str(error))
    runtime = RUNTIMES.get(format_name, (None,))[0]
    if runtime:
        pytest.importorskip(runtime, reason=f"{runtime} runs the {format_name} export ({export.INSTALL})")


def _run_exported(format_name: str, path: str, images: np.ndarray, tmp_path) -> np.ndarray:
    """The probabilities of the export at ``path``, computed in a fresh process by its own runtime."""
    images_path, out_path = str(tmp_path / "images.npy"), str(tmp_path / "probabilities.npy")
    np.save(images_path, images)
    result = subprocess.run([sys.executable, "-c", RUNTIMES[format_name][1], path, images_path, out_path],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out_path)


def _serve(path: str, images: np.ndarray) -> np.ndarray:
    loaded = tf.saved_model.load(path)
    (probabilities,) = loaded.signatures["serving_default"](tf.constant(images)).values()
    return probabilities.numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, keras.Model]:
    """A run directory holding a MobileNetV3-Small trained a few steps on synthetic 32 px images (its
    model.keras, classes.json and flags.txt), and that model."""
    keras.utils.set_random_seed(0)
    model = models.build_model("mobilenetv3small", len(CLASSES), SIZE, weights="none")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    labels = keras.utils.to_categorical(np.arange(64) % len(CLASSES), len(CLASSES))
    images = (_images(count=64, seed=1) // 2 + (np.arange(64) % len(CLASSES) * 32)[:, None, None, None]).astype(
        np.uint8)  # brighter by class, so that the few steps learn something
    model.fit(images, labels, batch_size=16, epochs=2, verbose=0)
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    model.save(run / rundir.MODEL)
    rundir.write_json(str(run / rundir.CLASSES), CLASSES)
    (run / rundir.FLAGS).write_text(f"--image_size={SIZE}\n--model=mobilenetv3small\n")
    return str(run), model


def _tiny_model() -> keras.Model:
    """Grey or RGB uint8 pixels in, as the real models, through two dense layers: quick to export."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, None), dtype="uint8", name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(models.XrayPreprocessing("torch")(inputs))
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Dense(8)(pooled)))


def test_saved_model_serves_the_temperature_scaled_probabilities(tmp_path):
    model = _tiny_model()
    images = _images()
    plain = np.asarray(model.predict_on_batch(images))
    export.export_saved_model(model, str(tmp_path / "plain"))
    export.export_saved_model(model, str(tmp_path / "calibrated"), temperature=TEMPERATURE)
    np.testing.assert_allclose(_serve(str(tmp_path / "plain"), images), plain, atol=1e-6)
    served = _serve(str(tmp_path / "calibrated"), images)
    assert np.abs(served - plain).max() > 1e-3  # the temperature is in the graph
    np.testing.assert_allclose(served, calibration.apply_temperature(plain, TEMPERATURE), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("format_name", ["onnx", "litert"])
def test_an_export_run_by_its_own_runtime_gives_the_keras_probabilities(format_name, trained, tmp_path):
    _needs(format_name)
    _, model = trained
    (path,) = export.export_model(model, str(tmp_path), [format_name])
    assert path == str(tmp_path / rundir.EXPORTS[format_name]) and os.path.isfile(path)
    for channels in (1, 3):  # grey and RGB through the same file
        images = _images(channels, seed=channels)
        expected = np.asarray(model.predict_on_batch(images))
        assert expected.std(axis=-1).min() > 1e-3  # trained: not the uniform output of a fresh model
        np.testing.assert_allclose(_run_exported(format_name, path, images, tmp_path), expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("format_name", ["onnx", "litert"])
def test_an_export_of_a_calibrated_run_applies_its_temperature(format_name, trained, tmp_path):
    _needs(format_name)
    run_dir, model = trained
    (path,) = export.export_model(model, str(tmp_path), [format_name], temperature=TEMPERATURE)
    images = _images()
    plain = np.asarray(model.predict_on_batch(images))
    scaled = _run_exported(format_name, path, images, tmp_path)
    assert np.abs(scaled - plain).max() > 1e-3
    np.testing.assert_allclose(scaled, calibration.apply_temperature(plain, TEMPERATURE), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("format_name", ["onnx", "litert"])
def test_a_mixed_precision_model_exports_in_float32(format_name, trained, tmp_path):
    """A run trained in bfloat16 (a GPU's default) ships a float32 graph: ONNX Runtime cannot load the mixed one."""
    _needs(format_name)
    _, model = trained
    with models.global_dtype_policy("mixed_bfloat16"):
        mixed = models.build_model("mobilenetv3small", len(CLASSES), SIZE, weights="none")
    mixed.set_weights(model.get_weights())
    (path,) = export.export_model(mixed, str(tmp_path), [format_name])
    images = _images()
    expected = np.asarray(model.predict_on_batch(images))  # the same weights, computed in float32
    assert np.abs(np.asarray(mixed.predict_on_batch(images)) - expected).max() > 1e-4  # bfloat16 rounds
    np.testing.assert_allclose(_run_exported(format_name, path, images, tmp_path), expected, atol=1e-4)


def test_every_format_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    """A missing converter is one error naming the package and the pip command; no file is left half done."""
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *args: None if name == "tf2onnx" else real_find_spec(name, *args))
    with pytest.raises(export.ExportError, match=r"onnx export on tensorflow needs tf2onnx, not installed: "
                                                 r"pip install 'xray_tf\[export\]'"):
        export.export_model(_tiny_model(), str(tmp_path), ["saved_model", "onnx"])
    assert os.listdir(tmp_path) == []
    with pytest.raises(export.ExportError, match="'bogus' is no export format"):
        export.check_formats(["bogus"])


def test_export_setting_names_known_formats_once():
    assert export_formats("saved_model, onnx,litert,onnx") == ("saved_model", "onnx", "litert")
    with pytest.raises(ConfigError, match=r"'bogus', 'tf': no export format; choose from saved_model, onnx, litert"):
        export_formats("onnx,bogus,tf")


@pytest.mark.slow
def test_the_cli_exports_a_run_and_refuses_what_it_cannot(trained, tmp_path):
    """``python -m xray_tf.export`` (``xray-export``) writes what was asked, with the run's temperature."""
    _needs("litert")
    run_dir, model = trained
    calibrated = tmp_path / "calibrated"
    calibrated.mkdir()  # the same files, as a second run with a temperature
    for name in (rundir.MODEL, rundir.CLASSES, rundir.FLAGS):
        os.link(os.path.join(run_dir, name), calibrated / name)
    calibration.write_calibration(str(calibrated), {"temperature": TEMPERATURE, "saved_model": False})
    result = run_module("xray_tf.export", str(calibrated), "--format=saved_model,litert")
    assert result.returncode == 0, result.stderr[-3000:]
    written = [str(calibrated / rundir.SAVED_MODEL), str(calibrated / rundir.TFLITE)]
    assert result.stdout.splitlines() == [f"Wrote {path}" for path in written]
    images = _images()
    expected = calibration.apply_temperature(np.asarray(model.predict_on_batch(images)), TEMPERATURE)
    np.testing.assert_allclose(_run_exported("litert", written[1], images, tmp_path), expected, atol=1e-4)
    np.testing.assert_allclose(_serve(written[0], images), expected, atol=1e-5)
    # The new SavedModel has the temperature: predictors must not apply it again.
    assert rundir.read_json(str(calibrated / rundir.CALIBRATION))["saved_model"] is True

    elsewhere = tmp_path / "ship"
    result = run_module("xray_tf.export", run_dir, "--format=litert", f"--output={elsewhere}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(elsewhere)) == [rundir.CLASSES, rundir.TFLITE]
    assert json.loads((elsewhere / rundir.CLASSES).read_text()) == CLASSES

    bogus = run_module("xray_tf.export", run_dir, "--format=onnx,tflite")
    assert bogus.returncode != 0
    assert bogus.stderr.strip().splitlines()[-1] == ("xray-export: error: --format=onnx,tflite: 'tflite': no export "
                                                     "format; choose from saved_model, onnx, litert, comma-separated.")
    not_a_run = run_module("xray_tf.export", str(tmp_path / "ship"), "--format=litert")
    assert not_a_run.returncode != 0
    assert not_a_run.stderr.strip().splitlines()[-1] == (f"xray-export: error: {elsewhere}: not a run directory of "
                                                         f"xray-train: no {rundir.MODEL} to export.")


@pytest.mark.slow
def test_on_jax_the_saved_model_and_onnx_export_and_litert_says_which_backend_it_needs(trained, tmp_path):
    """Keras converts ONNX on JAX with jax2onnx (not in the export extra: it brings Flax and Orbax), LiteRT not."""
    run_dir, model = trained
    code = """
import importlib.util, sys
from xray_tf import export, models
model = models.load_model(sys.argv[1], compile=False)
formats = ["saved_model", "onnx"] if importlib.util.find_spec("jax2onnx") else ["saved_model"]
print(export.export_model(model, sys.argv[2], formats))
for name in ("onnx", "litert"):
    try:
        export.check_formats([name])
    except export.ExportError as error:
        print(error)
"""
    result = run_under_jax(code, os.path.join(run_dir, rundir.MODEL), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Cannot export: Keras exports litert from the tensorflow backend only, not jax: export the run's "
            "model.keras under KERAS_BACKEND=tensorflow (xray-export RUN --format=litert).") in result.stdout
    images = _images()
    expected = np.asarray(model.predict_on_batch(images))
    np.testing.assert_allclose(_serve(str(tmp_path / rundir.SAVED_MODEL), images), expected, atol=1e-5)
    if os.path.isfile(tmp_path / rundir.ONNX):
        _needs("onnx")
        np.testing.assert_allclose(_run_exported("onnx", str(tmp_path / rundir.ONNX), images, tmp_path), expected,
                                   atol=1e-4)
    else:
        assert ("Cannot export: onnx export on jax needs jax2onnx, not installed: pip install jax2onnx."
                in result.stdout)
