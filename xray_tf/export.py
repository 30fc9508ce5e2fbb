"""The model as files that users ship: a SavedModel, ONNX and LiteRT, each taking raw uint8 pixels.

Every format takes uint8 images ``[batch, H, W, C]`` and returns class probabilities, temperature-scaled
when the run is calibrated, so a server gets what ``xray-evaluate`` and ``xray-predict`` report. The
channel count C stays dynamic in all three (1 for grey, 3 for RGB, which the model averages to grey):
TensorFlow, ONNX Runtime and the LiteRT interpreter (after ``resize_tensor_input``) all take either.
Loading an export needs only its own runtime, not xray_tf.

Keras converts each format on the backend it runs on: ONNX on TensorFlow (tf2onnx) or JAX (jax2onnx),
LiteRT on TensorFlow only; ``check_formats`` says which packages or which backend a format lacks before
anything is written. ``python -m xray_tf.export RUN`` is ``xray-export`` (``xray_tf.cli.export``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence

if __name__ == "__main__":  # python -m xray_tf.export RUN: the command, before Keras loads (and prints its noise)
    from xray_tf.cli.export import main

    main()

import keras  # noqa: E402
from keras import ops  # noqa: E402

from xray_tf import calibration, models, rundir  # noqa: E402
from xray_tf.config import EXPORT_FORMATS  # noqa: E402

INSTALL = "pip install 'xray_tf[export]'"
# The packages Keras converts a format with, by backend; a backend not named cannot convert it.
_CONVERTERS = {"saved_model": {"tensorflow": (), "jax": ()},
               "onnx": {"tensorflow": ("onnx", "tf2onnx"), "jax": ("onnx", "jax2onnx")},
               "litert": {"tensorflow": ()}}
_KERAS_FORMAT = {"saved_model": "tf_saved_model", "onnx": "onnx", "litert": "litert"}


class ExportError(ValueError):
    """A format that cannot be exported here: a missing package or an unsupported backend."""


class _Temperature(keras.layers.Layer):
    """``softmax(log(p) / T)``: ``calibration.apply_temperature`` inside the exported graph."""

    def __init__(self, temperature: float, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities):
        # A softmax that underflowed to 0 would give log 0; the smallest positive float32 stands in.
        logits = ops.log(ops.maximum(ops.cast(probabilities, "float32"), 1.1754944e-38))
        return ops.softmax(logits / self.temperature, axis=-1)


def check_formats(formats: Sequence[str]) -> None:
    """Raise ExportError listing every format of ``formats`` that this backend or installation cannot write."""
    backend, problems = keras.backend.backend(), []
    for name in formats:
        if name not in _CONVERTERS:
            problems.append(f"{name!r} is no export format (choose from {', '.join(EXPORT_FORMATS)})")
        elif backend not in _CONVERTERS[name]:
            backends = " or ".join(_CONVERTERS[name])
            problems.append(f"Keras exports {name} from the {backends} backend only, not {backend}: export the "
                            f"run's model.keras under KERAS_BACKEND=tensorflow (xray-export RUN --format={name})")
        else:
            missing = [package for package in _CONVERTERS[name][backend] if importlib.util.find_spec(package) is None]
            if missing:
                hint = INSTALL if backend == "tensorflow" else f"pip install {' '.join(missing)}"
                problems.append(f"{name} export on {backend} needs {', '.join(missing)}, not installed: {hint}")
    if problems:
        raise ExportError("Cannot export: " + "; ".join(problems) + ".")


def _in_float32(config: object) -> object:
    """A serialized model's ``config`` with every layer computing in float32 instead of a mixed policy."""
    if isinstance(config, list):
        return [_in_float32(item) for item in config]
    if not isinstance(config, dict):
        return config
    converted = {key: _in_float32(value) for key, value in config.items()}
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and str(dtype.get("config", {}).get("name", "")).startswith("mixed_"):
        converted["dtype"] = {**dtype, "config": {**dtype["config"], "name": "float32"}}
    elif dtype in ("float16", "bfloat16"):  # a nested backbone's input, fed by a mixed layer
        converted["dtype"] = "float32"
    return converted


def _float32(model: keras.Model) -> keras.Model:
    """``model``, or a float32 copy of one trained with ``--mixed_precision``: ONNX Runtime cannot load the
    bfloat16 graph tf2onnx writes, and float32 is what ONNX and LiteRT runtimes run everywhere."""
    config = {key: value for key, value in keras.saving.serialize_keras_object(model).items()
              if key != "compile_config"}
    converted = _in_float32(config)
    if converted == config:
        return model
    copy = models.model_from_config(converted)
    copy.set_weights(model.get_weights())  # a mixed policy keeps its variables in float32 already
    return copy


def _served(model: keras.Model, temperature: float | None) -> keras.Model:
    """``model`` with the temperature applied to its probabilities (itself without one)."""
    if temperature is None:
        return model
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
    return keras.Model(inputs, _Temperature(temperature, name="temperature")(model(inputs)), name=model.name)


@contextlib.contextmanager
def _quiet_converters() -> Iterator[None]:
    """Only the converters' errors: tf2onnx logs a traceback for each graph optimisation it skips and
    jax2onnx's serializer a warning per untyped constant, though the models they write are right, and
    Keras' patch of tf2onnx for NumPy 2 trips NumPy's warning about ``np.object``."""
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"In the future `np\.object`", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_format(model: keras.Model, path: str, format: str, temperature: float | None = None) -> None:
    """Write ``model`` (plus ``temperature`` when given) as ``format`` at ``path``, replacing what is there."""
    check_formats([format])
    served = _served(model if format == "saved_model" else _float32(model), temperature)
    options = {}
    if format == "saved_model" and keras.backend.backend() == "jax":
        # Keras converts the model with jax2tf, by default with its gradient, which saving then traces
        # and stores: most of an export's time, for a serving signature nobody differentiates.
        options = {"jax2tf_kwargs": {"with_gradient": False}}
    if format == "saved_model" and os.path.isdir(path) and not os.path.islink(path):  # an earlier export
        shutil.rmtree(path)  # a folder cannot be renamed onto; files are replaced by the rename itself
    # Given, not inferred: Keras infers ONNX's input only from a model that was called, which a loaded one was not.
    image = served.inputs[0]
    signature = [keras.InputSpec(shape=image.shape, dtype=image.dtype, name=image.name)]

    def write(staging: str) -> None:
        with _quiet_converters():
            served.export(staging, format=_KERAS_FORMAT[format], verbose=False, input_signature=signature, **options)

    rundir.write_atomic(path, write, directory=format == "saved_model")


def export_saved_model(model: keras.Model, path: str, temperature: float | None = None) -> None:
    """``export_format(model, path, "saved_model", temperature)``: the SavedModel alone, at any path."""
    export_format(model, path, "saved_model", temperature)


def export_model(model: keras.Model, directory: str, formats: Sequence[str] = ("saved_model",),
                 temperature: float | None = None) -> list[str]:
    """Export ``model`` in each of ``formats`` into ``directory`` under the run's names; the paths written.

    ``rundir.EXPORTS`` names the files (``saved_model/``, ``model.onnx``, ``model.tflite``). Every
    format is checked before the first is written, so a missing package costs no half-done export.
    """
    check_formats(formats)
    paths = []
    for name in dict.fromkeys(formats):
        path = os.path.join(directory, rundir.EXPORTS[name])
        export_format(model, path, name, temperature)
        paths.append(path)
    return paths


def export_run(run_dir: str, formats: Sequence[str], output_dir: str | None = None) -> list[str]:
    """Export the kept model of the finished run ``run_dir`` into ``output_dir`` (the run itself by default).

    The run's temperature (``calibration.json``) goes into every export. Elsewhere than in the run, its
    ``classes.json`` is copied beside the files, where ``xray-predict`` looks for class names; in the run,
    ``calibration.json`` records that a new SavedModel has the temperature built in.
    """
    model_path = os.path.join(run_dir, rundir.MODEL)
    if not os.path.isfile(model_path):
        what = "an unfinished run" if rundir.is_run_dir(run_dir) else "not a run directory of xray-train"
        raise rundir.RunError(f"{run_dir}: {what}: no {rundir.MODEL} to export.")
    check_formats(formats)
    output_dir = output_dir or run_dir
    with rundir.writing(output_dir, "the exports' folder"):
        os.makedirs(output_dir, exist_ok=True)
    model = models.load_model(model_path, compile=False)
    temperature = calibration.read_temperature(run_dir)
    paths = export_model(model, output_dir, formats, temperature)
    if not os.path.samefile(output_dir, run_dir):
        rundir.write_json(os.path.join(output_dir, rundir.CLASSES), rundir.read_classes(run_dir))
    elif temperature is not None and "saved_model" in formats:
        stored = rundir.read_json(os.path.join(run_dir, rundir.CALIBRATION))
        calibration.write_calibration(run_dir, {**stored, "saved_model": True})
    return paths
