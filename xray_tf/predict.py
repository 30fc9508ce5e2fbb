"""Classifying X-ray files with a trained model, optionally with Grad-CAM (``xray-predict``).

The model, or the models of an ensemble, come loaded as ``predictors.Predictor`` (a run directory,
a SavedModel or a ``.keras`` file, with its class names and temperature); this module finds the
files, decodes, batches and writes the CSV. Probabilities come from ``inference``, as in
``xray-evaluate``: with the run's temperature (``calibration.json``), averaged over test-time
augmentation views and over an ensemble's members. Every file is decoded
on its own with ``decode.decode_image``, the decoding used in training, so a file that cannot be
read is reported by name with the reason while every other file is still predicted; what must not
be opened or decoded (a FIFO, an image whose header declares more than ``max_pixels``) is refused
first, as in training. Predictions come batch by batch (``predict_batches``), so that
``PredictionWriter`` can write each batch's CSV rows as soon as they are known: a failure late in
a long run loses none of them.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from xray_tf import decode, gradcam, image_headers, inference, rundir
from xray_tf.config import DEFAULT_MAX_PIXELS, ConfigError
from xray_tf.predictors import Predictor

logger = logging.getLogger(__name__)

# Searched for in folders; a file named on the command line is tried whatever its name. Hidden files
# are skipped in folders: macOS' "._name.jpg" companions, for one, are not images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_DECODE_THREADS = min(8, os.cpu_count() or 1)
CSV_FILE = "the predictions CSV"  # what is being written, in the message of an OSError (``rundir.writing``)


@dataclasses.dataclass
class Prediction:
    """The outcome for one file: probabilities, or the reason it could not be read."""

    file: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    gradcam: str | None = None


def check_destinations(output: str | None, gradcam_dir: str | None) -> None:
    """Raise ``rundir.writing``'s RunError now, before any work, for an ``output`` that is a folder or a
    ``gradcam_dir`` that is a file, so that nothing is written anywhere."""
    if output and os.path.isdir(output):
        with rundir.writing(output, CSV_FILE):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), output)
    if gradcam_dir and os.path.lexists(gradcam_dir) and not os.path.isdir(gradcam_dir):
        with rundir.writing(gradcam_dir, "the Grad-CAM folder"):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), gradcam_dir)


def _unlisted(error: OSError) -> None:
    logger.warning("cannot list %s (%s): the images in it are left out", error.filename, error.strerror)


def find_images(paths: Sequence[str]) -> list[str]:
    """The files to classify: each PATH that is no folder, and the image files under each folder, recursively.

    Folders are listed in sorted order; a file reached twice is classified once. A PATH that is a
    FIFO, a symlink loop or the like is kept, to be reported in its row (``decode_file`` never
    opens it); only a PATH that does not exist at all is an error, most likely a typing mistake.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, folders, names in os.walk(path, onerror=_unlisted):
                folders[:] = [folder for folder in folders if not folder.startswith(".")]
                found += [os.path.join(root, name) for name in names
                          if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
            files += sorted(found)
        elif image_headers.file_problem(path) == "does not exist":
            raise FileNotFoundError(f"{path}: no such file or folder.")
        else:
            files.append(path)
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}.")
    return list(dict.fromkeys(files))


Decoded = tuple[np.ndarray | None, str | None]  # (uint8 [S, S, 1], None) or (None, why it cannot be read)


def _decode_checked(path: str, check: image_headers.Precheck, image_size: int) -> Decoded:
    if check.problem is not None:
        return None, check.problem
    try:
        return decode.decode_image(tf.constant(path), image_size).numpy(), None
    except tf.errors.OpError as error:  # corrupt, truncated, empty, not an image
        return None, decode.explain_failure(path, error)


def decode_file(path: str, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """``(uint8 [S, S, 1], None)`` decoded exactly as in training, or ``(None, why not)`` in training's words."""
    return _decode_checked(path, image_headers.precheck(path, max_pixels), image_size)


def _decode_files(pool: ThreadPoolExecutor, paths: Sequence[str], image_size: int, max_pixels: int) -> list[Decoded]:
    """``decode_file`` of each path, ``_DECODE_THREADS`` at a time; a file that may take more than its share of
    ``image_headers.DECODE_MEMORY`` is decoded after the others, alone, so together they hold at most that."""
    checks = [image_headers.precheck(path, max_pixels) for path in paths]
    shared = [i for i, check in enumerate(checks) if not check.decodes_alone(_DECODE_THREADS)]
    decoded = dict(zip(shared, pool.map(lambda i: _decode_checked(paths[i], checks[i], image_size), shared)))
    return [decoded[i] if i in decoded else _decode_checked(path, checks[i], image_size)
            for i, path in enumerate(paths)]


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


def _save_overlay(path: str, overlay: np.ndarray) -> None:
    png = io.BytesIO()
    Image.fromarray(overlay).save(png, format="PNG")
    rundir.write_bytes(path, png.getvalue())  # whole or not at all, even when the disk fills


def _overlay(grey: np.ndarray, heatmap: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
             explained: int | None) -> np.ndarray:
    """The labelled overlay: the predicted class and its probability above, a colour bar beside."""
    predicted = int(np.argmax(probabilities))
    return gradcam.annotated_overlay(grey, heatmap, class_names[predicted], float(probabilities[predicted]),
                                     None if explained is None else class_names[explained])


def predict_batches(
    predictor: Predictor | Sequence[Predictor],
    files: Sequence[str],
    batch_size: int = 32,
    gradcam_dir: str | None = None,
    gradcam_class: int | None = None,
    overlay_size: int = 512,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tta: str = "none",
) -> Iterator[list[Prediction]]:
    """Classify ``files`` in batches, yielding each batch's predictions as soon as it is done; with
    ``gradcam_dir``, also save a Grad-CAM overlay PNG for each readable file first.

    Several predictors (``predictors.load_ensemble``) predict the mean of their probabilities; each averages
    over the ``tta`` views (``config.TTA_MODES``). Grad-CAM explains one model, so it refuses an
    ensemble; it explains ``gradcam_class`` (an index) or else each image's predicted class, on the
    image itself (not its views), and draws over the image decoded at ``overlay_size`` px, captioned
    with the predicted class and its probability. A file that is refused (``image_headers.precheck``:
    not a regular file, more than ``max_pixels``) or does not decode gets its reason in ``error``. A
    folder or overlay that cannot be written raises ``rundir.writing``'s RunError. The arguments are checked,
    and ``gradcam_dir`` is made, when this is called, before the first batch is asked for.
    """
    predictors = [predictor] if isinstance(predictor, Predictor) else list(predictor)
    first = predictors[0]
    if batch_size < 1 or overlay_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and overlay_size ({overlay_size}) must be positive.")
    if gradcam_class is not None and not 0 <= gradcam_class < len(first.class_names):
        raise ValueError(f"gradcam_class={gradcam_class} is no class index of {first.class_names}.")
    cam = None
    if gradcam_dir is not None:
        if len(predictors) > 1:
            raise ConfigError("gradcam_dir", gradcam_dir, f"Grad-CAM explains one model, not an ensemble of "
                              f"{len(predictors)}: predict with one model for the overlays.")
        if first.keras_model is None:
            raise ValueError(f"Grad-CAM needs the Keras model (a run directory or its model.keras), not "
                             f"{first.name}: a SavedModel, ONNX or LiteRT export has no layers to explain.")
        cam = gradcam.GradCam(first.keras_model)
        with rundir.writing(gradcam_dir, "the Grad-CAM folder"):
            os.makedirs(gradcam_dir, exist_ok=True)
    return _batches(predictors, files, batch_size, tta, max_pixels, cam, gradcam_dir, gradcam_class, overlay_size)


def _batches(predictors: list[Predictor], files: Sequence[str], batch_size: int, tta: str, max_pixels: int,
             cam: gradcam.GradCam | None, gradcam_dir: str | None, gradcam_class: int | None,
             overlay_size: int) -> Iterator[list[Prediction]]:
    first, members = predictors[0], [predictor.member() for predictor in predictors]
    names = overlay_names(files) if cam is not None else {}
    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        for start in range(0, len(files), batch_size):
            chunk = [Prediction(path) for path in files[start : start + batch_size]]
            images = []
            decoded = _decode_files(pool, [result.file for result in chunk], first.image_size, max_pixels)
            for result, (image, error) in zip(chunk, decoded):
                result.error = error
                if image is not None:
                    images.append(image)
            readable = [result for result in chunk if result.error is None]
            if readable:
                batch = np.stack(images)
                probabilities = inference.ensemble_probabilities(members, [batch], batch_size, tta)
                for result, row in zip(readable, probabilities):
                    result.probabilities = row
            if readable and cam is not None:
                explained = probabilities.argmax(axis=-1) if gradcam_class is None else [gradcam_class] * len(batch)
                heatmaps = cam.heatmaps(batch, np.asarray(explained))
                originals = _decode_files(pool, [result.file for result in readable], overlay_size, max_pixels)
                for result, heatmap, (original, _) in zip(readable, heatmaps, originals):
                    result.gradcam = os.path.join(gradcam_dir, names[result.file])
                    _save_overlay(result.gradcam, _overlay(original[..., 0], heatmap, result.probabilities,
                                                           first.class_names, gradcam_class))
            yield chunk


def predict_files(predictor: Predictor | Sequence[Predictor], files: Sequence[str], *args: object,
                  **kwargs: object) -> list[Prediction]:
    """Every prediction of ``predict_batches(predictor, files, ...)`` (the same arguments), in one list."""
    return [result for batch in predict_batches(predictor, files, *args, **kwargs) for result in batch]


class PredictionWriter:
    """Predictions as CSV rows on ``stream``: file, predicted_class, ``p_<class>`` per class, ``flag_<class>``
    per class of ``thresholds`` (1 where ``p_<class>`` is at least its threshold), [gradcam,] error (empty
    when read). The columns and their values are ``inference.predictions_table``'s, as in ``xray-evaluate``.
    The header is written at once and each ``write`` is flushed, so that what was written survives a
    later failure; ``name`` is the stream's name in ``rundir.writing``'s errors.
    """

    def __init__(self, stream: TextIO, class_names: Sequence[str], with_gradcam: bool = False,
                 name: str = "standard output", thresholds: Mapping[str, float] | None = None):
        self.stream, self.class_names, self.with_gradcam, self.name = stream, list(class_names), with_gradcam, name
        self.thresholds = dict(thresholds or {})
        self.writer = csv.writer(stream)
        self._write_rows([[*self._table([]).columns] + (["gradcam"] if with_gradcam else []) + ["error"]])

    def _table(self, predictions: Sequence[Prediction]) -> pd.DataFrame:
        probabilities = np.reshape([result.probabilities for result in predictions], (-1, len(self.class_names)))
        return inference.predictions_table([result.file for result in predictions], probabilities, self.class_names,
                                           thresholds=self.thresholds)

    def write(self, predictions: Sequence[Prediction]) -> None:
        table = self._table([result for result in predictions if result.probabilities is not None])
        values = table.drop(columns="file").itertuples(index=False)
        rows = []
        for result in predictions:
            if result.probabilities is None:
                row = [result.file] + [""] * (len(table.columns) - 1)
            else:
                row = [result.file] + [f"{value:.6g}" if isinstance(value, float) else str(value)
                                       for value in next(values)]
            rows.append(row + ([result.gradcam or ""] if self.with_gradcam else []) + [result.error or ""])
        self._write_rows(rows)

    def _write_rows(self, rows: list[list[str]]) -> None:
        with rundir.writing(self.name, CSV_FILE):
            self.writer.writerows(rows)
            self.stream.flush()


def to_csv(predictions: Sequence[Prediction], class_names: Sequence[str], with_gradcam: bool = False,
           thresholds: Mapping[str, float] | None = None) -> str:
    """``PredictionWriter``'s CSV of ``predictions``, as text."""
    buffer = io.StringIO()
    PredictionWriter(buffer, class_names, with_gradcam, thresholds=thresholds).write(predictions)
    return buffer.getvalue()


def class_index(value: str, class_names: Sequence[str]) -> int:
    """A class given by name or number (``gradcam_class``) as an index: a class name, or a number below the
    number of classes."""
    if value in class_names:
        return list(class_names).index(value)
    if value.isdigit() and int(value) < len(class_names):
        return int(value)
    raise ConfigError("gradcam_class", value, f"neither one of {', '.join(class_names)} nor an index below "
                      f"{len(class_names)}.")
