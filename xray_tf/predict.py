"""Classifying X-ray files with a trained model, optionally with Grad-CAM (``xray-predict``).

A model is a run directory of ``xray-train`` (its ``model.keras`` is used), a SavedModel
directory or a ``.keras`` file. Every file is decoded on its own with ``decode.decode_image``, the
decoding used in training, so a file that cannot be read is reported by name with the reason
while every other file is still predicted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from xray_tf import (
    decode,
    gradcam,
    models,  # noqa: F401  (registers XrayPreprocessing, so safe_mode loading finds it)
    rundir,
)
from xray_tf.config import ConfigError

logger = logging.getLogger(__name__)

# Searched for in folders; a file named on the command line is tried whatever its name. Hidden files
# are skipped in folders: macOS' "._name.jpg" companions, for one, are not images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass
class Predictor:
    """A loaded classifier: uint8 batches ``[B, S, S, 1]`` -> probabilities ``[B, len(class_names)]``."""

    predict: Callable[[np.ndarray], np.ndarray]
    image_size: int
    class_names: list[str]
    keras_model: keras.Model | None  # None for a bare SavedModel, which cannot give Grad-CAM


@dataclasses.dataclass
class Prediction:
    """The outcome for one file: probabilities, or the reason it could not be read."""

    file: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    gradcam: str | None = None


def find_images(paths: Sequence[str]) -> list[str]:
    """The files to classify: each PATH that is a file, and the image files under each folder, recursively.

    Folders are listed in sorted order; a file reached twice is classified once.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, folders, names in os.walk(path):
                folders[:] = [folder for folder in folders if not folder.startswith(".")]
                found += [os.path.join(root, name) for name in names
                          if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
            files += sorted(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder.")
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}.")
    return list(dict.fromkeys(files))


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
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises several types for a file that is no Keras model
        raise ValueError(f"{path} cannot be loaded as a Keras model: {error}") from error
    image_size = model.input_shape[1]
    if image_size is None:
        raise ValueError(f"{path}: the model has no fixed input size, so images cannot be resized for it.")
    class_names = _class_names([os.path.join(os.path.dirname(path), rundir.CLASSES)], model.output_shape[-1])
    return Predictor(lambda images: np.asarray(model.predict_on_batch(images)), image_size, class_names, model)


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
    return Predictor(predict, spec.shape[1], _class_names(candidates, output_spec.shape[-1]), None)


def load_predictor(model_path: str) -> Predictor:
    """Load a run directory (its ``model.keras``, else its ``saved_model/``), a SavedModel or a .keras file."""
    keras_file = os.path.join(model_path, rundir.MODEL)
    if os.path.isfile(model_path) and model_path.endswith(".keras"):
        return _load_keras(model_path)
    if os.path.isfile(keras_file):
        return _load_keras(keras_file)
    for saved_model in (model_path, os.path.join(model_path, rundir.SAVED_MODEL)):
        if os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
            return _load_saved_model(saved_model)
    raise ConfigError("model", model_path, f"neither a run directory (with {rundir.MODEL} or {rundir.SAVED_MODEL}/), "
                      "a SavedModel directory nor a .keras file.")


def decode_file(path: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """``(uint8 [S, S, 1], None)`` decoded exactly as in training, or ``(None, why it cannot be read)``."""
    try:
        return decode.decode_image(tf.constant(path), image_size).numpy(), None
    except tf.errors.OpError as error:  # corrupt, truncated, empty, not an image, unreadable
        return None, decode.decode_error_message(error)


def overlay_names(files: Sequence[str]) -> dict[str, str]:
    """A unique PNG name per file, after its own name: ``x.jpeg`` -> ``x.png``, a second ``x`` -> ``x-2.png``."""
    names, taken = {}, set()
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, count = f"{stem}.png", 1
        while name.lower() in taken:  # lower case: unique on case-insensitive file systems too
            count += 1
            name = f"{stem}-{count}.png"
        taken.add(name.lower())
        names[path] = name
    return names


def predict_files(
    predictor: Predictor,
    files: Sequence[str],
    batch_size: int = 32,
    gradcam_dir: str | None = None,
    gradcam_class: int | None = None,
    overlay_size: int = 512,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """Classify ``files`` in batches; with ``gradcam_dir``, also save a Grad-CAM overlay PNG for each.

    Grad-CAM explains ``gradcam_class`` (an index) or else each image's predicted class, and draws
    over the image decoded at ``overlay_size`` px. ``on_progress(done, total)`` follows each batch.
    """
    if batch_size < 1 or overlay_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and overlay_size ({overlay_size}) must be positive.")
    if gradcam_class is not None and not 0 <= gradcam_class < len(predictor.class_names):
        raise ValueError(f"gradcam_class={gradcam_class} is no class index of {predictor.class_names}.")
    cam = None
    if gradcam_dir is not None:
        if predictor.keras_model is None:
            raise ValueError("Grad-CAM needs the Keras model: a run directory or its model.keras, "
                             "not a bare SavedModel.")
        cam = gradcam.GradCam(predictor.keras_model)
        os.makedirs(gradcam_dir, exist_ok=True)
        names = overlay_names(files)
    results = []
    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        for start in range(0, len(files), batch_size):
            chunk = [Prediction(path) for path in files[start : start + batch_size]]
            images = []
            decoded = pool.map(lambda result: decode_file(result.file, predictor.image_size), chunk)
            for result, (image, error) in zip(chunk, decoded):
                result.error = error
                if image is not None:
                    images.append(image)
            readable = [result for result in chunk if result.error is None]
            if readable:
                batch = np.stack(images)
                probabilities = predictor.predict(batch)
                for result, row in zip(readable, probabilities):
                    result.probabilities = row
            if readable and cam is not None:
                explained = probabilities.argmax(axis=-1) if gradcam_class is None else [gradcam_class] * len(batch)
                heatmaps = cam.heatmaps(batch, np.asarray(explained))
                originals = pool.map(lambda r: decode_file(r.file, overlay_size)[0], readable)
                for result, heatmap, original in zip(readable, heatmaps, originals):
                    result.gradcam = os.path.join(gradcam_dir, names[result.file])
                    Image.fromarray(gradcam.overlay(original[..., 0], heatmap)).save(result.gradcam)
            results += chunk
            if on_progress is not None:
                on_progress(len(results), len(files))
    return results


def to_csv(predictions: Sequence[Prediction], class_names: Sequence[str], with_gradcam: bool = False) -> str:
    """CSV text: file, predicted_class, ``p_<class>`` per class, [gradcam,] error (empty when read)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "predicted_class", *[f"p_{name}" for name in class_names]]
                    + (["gradcam"] if with_gradcam else []) + ["error"])
    for result in predictions:
        if result.probabilities is None:
            row = [result.file, ""] + [""] * len(class_names)
        else:
            row = [result.file, class_names[int(np.argmax(result.probabilities))]]
            row += [f"{p:.6g}" for p in result.probabilities]
        writer.writerow(row + ([result.gradcam or ""] if with_gradcam else []) + [result.error or ""])
    return buffer.getvalue()


def class_index(value: str, class_names: Sequence[str]) -> int:
    """A class given by name or number (``gradcam_class``) as an index: a class name, or a number below the number of classes."""
    if value in class_names:
        return list(class_names).index(value)
    if value.isdigit() and int(value) < len(class_names):
        return int(value)
    raise ConfigError("gradcam_class", value, f"neither one of {', '.join(class_names)} nor an index below "
                      f"{len(class_names)}.")
