"""Loading a trained model for prediction: whatever form it comes in, one uniform ``Predictor``.

A model reaches ``xray-predict`` as a run directory of ``xray-train`` (its ``model.keras``, else its
``saved_model/``), a bare SavedModel directory, a ``.keras`` file, or an ONNX (``.onnx``, run by ONNX
Runtime) or LiteRT (``.tflite``) export. Each is loaded here into a ``Predictor``: a function from
uint8 batches to probabilities, with the image size it needs, its class names (the ``classes.json``
beside it, or for an export also above it) and the temperature of the run holding it
(``calibration.json``), so that prediction need not know which form it was. A SavedModel or export
of a calibrated run has that temperature built into its graph, which the ``Predictor`` records so
that it is applied once. Several models make an ensemble (``load_ensemble``), checked to share classes
and image size; ``operating_thresholds`` reads the thresholds ``xray-evaluate`` stored in a run.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from xray_tf import calibration, export, inference, models, rundir
from xray_tf.config import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Predictor:
    """A loaded classifier: uint8 batches ``[B, S, S, 1]`` -> probabilities ``[B, len(class_names)]``.

    ``temperature`` is the run's softmax temperature in the probabilities this model gives (None: the
    model's own), applied to ``predict``'s output unless ``temperature_built_in`` (a calibrated run's
    SavedModel applies it itself); operating points are checked against it.
    """

    predict: Callable[[np.ndarray], np.ndarray]
    image_size: int
    class_names: list[str]
    keras_model: keras.Model | None  # None for a bare SavedModel or an export, which cannot give Grad-CAM
    name: str  # the path it was loaded from, in messages
    run_dir: str  # the folder holding it: a run's calibration.json and operating_points.json are read here
    temperature: float | None = None
    temperature_built_in: bool = False

    def member(self) -> inference.Member:
        """This model as one member of ``inference``'s ensembles."""
        return inference.Member(self.predict, None if self.temperature_built_in else self.temperature, self.name)


def _class_names(candidates: Sequence[str], num_classes: int) -> list[str]:
    """Class names from the first ``classes.json`` among ``candidates``, else ``class_0``, ``class_1``..."""
    for path in candidates:
        if os.path.isfile(path):
            names = rundir.read_json(path)
            if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
                raise ValueError(f"{path} must list {num_classes} class names (the model has {num_classes} outputs).")
            return names
    logger.warning("No classes.json beside the model (looked for %s): classes are named by index.",
                   ", ".join(candidates))
    return [f"class_{i}" for i in range(num_classes)]


def _load_keras(path: str) -> Predictor:
    """The ``.keras`` model: predicts on any Keras backend and gives Grad-CAM."""
    model = models.load_model(path, compile=False)
    image_size = model.input_shape[1]
    if image_size is None:
        raise ValueError(f"{path}: the model has no fixed input size, so images cannot be resized for it.")
    run_dir = os.path.dirname(os.path.abspath(path))
    class_names = _class_names([os.path.join(run_dir, rundir.CLASSES)], model.output_shape[-1])
    return Predictor(inference.keras_member(model).predict, image_size, class_names, model, path, run_dir)


def _load_saved_model(path: str) -> Predictor:
    """A SavedModel's serving signature: TensorFlow only, no Grad-CAM (there are no Keras layers to split)."""
    try:
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures["serving_default"]
    except (OSError, KeyError, ValueError, tf.errors.OpError) as error:
        raise ValueError(f"{path} is no SavedModel with a serving_default signature: {error}") from error
    ((input_name, spec),) = signature.structured_input_signature[1].items()
    ((_, output_spec),) = signature.structured_outputs.items()
    if spec.dtype != tf.uint8 or spec.shape.rank != 4 or spec.shape[1] is None:
        raise ValueError(f"{path}: the serving signature takes {spec}, not uint8 images of a fixed size.")

    def predict(images: np.ndarray) -> np.ndarray:
        # `loaded` must stay referenced: the signature's variables live as long as it does.
        (probabilities,) = loaded.signatures["serving_default"](**{input_name: tf.constant(images)}).values()
        return probabilities.numpy()

    run_dir = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(path, rundir.CLASSES), os.path.join(run_dir, rundir.CLASSES)]
    return Predictor(predict, spec.shape[1], _class_names(candidates, output_spec.shape[-1]), None, path, run_dir)


def _exported_classes(path: str, num_classes: int) -> tuple[list[str], str]:
    """Class names of an exported file from the ``classes.json`` beside it or in the folder above; that folder."""
    beside = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(beside, rundir.CLASSES), os.path.join(os.path.dirname(beside), rundir.CLASSES)]
    found = next((os.path.dirname(candidate) for candidate in candidates if os.path.isfile(candidate)), beside)
    return _class_names(candidates, num_classes), found


def _image_size(path: str, shape: Sequence[object]) -> int:
    """The fixed side of an exported model's ``[batch, S, S, channels]`` input."""
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] < 1 or shape[1] != shape[2]:
        raise ValueError(f"{path}: takes input of shape {list(shape)}, not uint8 images of a fixed size.")
    return shape[1]


def _load_onnx(path: str) -> Predictor:
    """An ONNX export, run by ONNX Runtime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("model", path, f"running it needs onnxruntime, not installed: {export.INSTALL}.") from None
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # the file is input: ONNX Runtime fails on a foreign one with its own types
        raise ValueError(f"{path}: cannot be loaded by ONNX Runtime: {error}") from error
    (image,), (output,) = session.get_inputs(), session.get_outputs()
    if image.type != "tensor(uint8)":
        raise ValueError(f"{path}: takes {image.type}, not uint8 images.")
    class_names, run_dir = _exported_classes(path, output.shape[-1])

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([output.name], {image.name: images})[0]

    return Predictor(predict, _image_size(path, image.shape), class_names, None, path, run_dir)


def _load_tflite(path: str) -> Predictor:
    """A LiteRT export, run by the LiteRT interpreter (``ai_edge_litert``, else TensorFlow's own)."""
    try:
        interpreter_class = importlib.import_module("ai_edge_litert.interpreter").Interpreter
    except ImportError:
        interpreter_class = tf.lite.Interpreter
    try:
        interpreter = interpreter_class(model_path=path)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot be loaded by the LiteRT interpreter: {error}") from error
    (image,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    if image["dtype"] != np.uint8:
        raise ValueError(f"{path}: takes {np.dtype(image['dtype']).name}, not uint8 images.")
    class_names, run_dir = _exported_classes(path, int(output["shape"][-1]))

    def predict(images: np.ndarray) -> np.ndarray:
        # The batch and channel dimensions are dynamic: the interpreter is resized to each batch.
        interpreter.resize_tensor_input(image["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(image["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(output["index"]).copy()

    return Predictor(predict, _image_size(path, [int(size) for size in image["shape_signature"]]), class_names,
                     None, path, run_dir)


_EXPORTED_LOADERS = {".onnx": _load_onnx, ".tflite": _load_tflite}


def _load_model(model_path: str) -> Predictor:
    keras_file = os.path.join(model_path, rundir.MODEL)
    if os.path.isfile(model_path) and model_path.endswith(".keras"):
        return _load_keras(model_path)
    if os.path.isfile(model_path) and os.path.splitext(model_path)[1] in _EXPORTED_LOADERS:
        return _EXPORTED_LOADERS[os.path.splitext(model_path)[1]](model_path)
    if os.path.isfile(keras_file):
        return _load_keras(keras_file)
    for saved_model in (model_path, os.path.join(model_path, rundir.SAVED_MODEL)):
        if os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
            return _load_saved_model(saved_model)
    raise ConfigError("model", model_path, f"neither a run directory (with {rundir.MODEL} or {rundir.SAVED_MODEL}/), "
                      "a SavedModel directory nor a .keras, .onnx or .tflite file.")


def load_predictor(model_path: str, calibrated: bool = True) -> Predictor:
    """Load a run directory (its ``model.keras``, else its ``saved_model/``), a SavedModel, a .keras file or an
    ONNX or LiteRT export (``.onnx``, ``.tflite``).

    With ``calibrated``, the probabilities carry the temperature of the run holding the model
    (``calibration.json``), if it has one; without, the model's own, which a calibrated run's
    SavedModel cannot give (the temperature is part of its graph): that is a ConfigError.
    """
    predictor = _load_model(model_path)
    temperature = calibration.read_temperature(predictor.run_dir)
    if temperature is None:
        return predictor
    # The SavedModel was exported with the temperature when calibration.json says so (evaluate, train); an
    # ONNX or LiteRT file of a calibrated run always was (train, evaluate and xray-export put it in).
    built_in = predictor.keras_model is None and (not os.path.isdir(predictor.name) or rundir.read_json(
        os.path.join(predictor.run_dir, rundir.CALIBRATION)).get("saved_model") is True)
    if built_in and not calibrated:
        raise ConfigError("calibrated", False, f"{predictor.name} has its run's temperature ({temperature:.4g}, "
                          f"{rundir.CALIBRATION}) built in, which cannot be taken out: predict with the run's "
                          f"{rundir.MODEL} for the model's own probabilities.")
    return dataclasses.replace(predictor, temperature=temperature, temperature_built_in=built_in) if calibrated \
        else predictor


def load_ensemble(model_paths: Sequence[str], calibrated: bool = True) -> list[Predictor]:
    """``load_predictor`` of each path, checked to share classes (which name the task) and image size."""
    if not model_paths:
        raise ConfigError("model", None, "name at least one model.")
    predictors = [load_predictor(path, calibrated) for path in model_paths]
    inference.check_compatible("model", {predictor.name: {"classes": predictor.class_names,
                                                          "image_size": predictor.image_size}
                                         for predictor in predictors})
    return predictors


def operating_thresholds(predictors: Sequence[Predictor], specs: Sequence[str], tta: str = "none") -> dict[str, float]:
    """Class -> threshold of each ``CLASS:sensitivity=0.95`` spec, as ``xray-evaluate`` stored it in the model's run.

    A threshold holds only for probabilities made as when it was chosen: ``calibration.stored_threshold``
    checks the temperature and ``tta``. An ensemble has none of its own (``xray-evaluate`` keeps an
    ensemble's thresholds in its report, owned by no run), so asking for one is a ConfigError.
    """
    if not specs:
        return {}
    if len(predictors) > 1:
        raise ConfigError("operating_point", specs[0], f"an ensemble of {len(predictors)} models has no stored "
                          "threshold (each run's was chosen for that run's probabilities alone): predict with one "
                          "model.")
    first = predictors[0]
    return {point.class_name: calibration.stored_threshold(first.run_dir, point, first.temperature, tta)
            for point in calibration.parse_operating_points(specs, first.class_names)}
