"""The run directory: its file names, its creation, atomic writes, and the readers of its files.

No other module spells a run file's name. A run never writes into another run's directory, and
every file appears by rename from a temporary name beside it, so a crash or a full disk leaves
the previous complete file or none -- never half a ``history.csv`` or half a SavedModel. Files
and directories are created with modes ``0o666`` and ``0o777`` for the kernel to reduce by the
umask, as ``open`` and ``mkdir`` do, so colleagues and serving containers can read results where
the umask allows (``tempfile`` would make them private to the owner whatever the umask).

Only the standard library, pandas and the config are imported: tables and plots read run
directories without TensorFlow.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime

import pandas as pd

from xray_tf.config import TrainConfig
from xray_tf.data import DataIndex
from xray_tf.tables import read_csv_checked

FLAGS = "flags.txt"  # every setting, reusable as --flagfile
CLASSES = "classes.json"  # class names in the order of the model's outputs
HISTORY = "history.csv"  # one row per finished epoch
METRICS = "metrics.json"  # written last: a run with it has finished
MODEL = "model.keras"
SAVED_MODEL = "saved_model"  # the kept model as a TensorFlow SavedModel (--export=saved_model)
ONNX = "model.onnx"  # the kept model for ONNX Runtime (--export=onnx)
TFLITE = "model.tflite"  # the kept model for the LiteRT (TensorFlow Lite) interpreter (--export=litert)
EXPORTS = {"saved_model": SAVED_MODEL, "onnx": ONNX, "litert": TFLITE}  # --export format -> its file
SKIPPED_IMAGES = "skipped_images.csv"
BACKUP = "backup"  # per-epoch training state while the run is unfinished
SPLITS_CSV = "splits.csv"  # path, class, split, patient group of every image: the split, auditable and reusable
CALIBRATION = "calibration.json"  # the softmax temperature fitted on val (--calibrate)
OPERATING_POINTS = "operating_points.json"  # per-class thresholds chosen on val (--operating_point)
REPORT = "report.html"  # xray-report's self-contained page
TENSORBOARD = "tensorboard"  # --tensorboard: event files of the train/ and validation/ writers
# xray-pretrain's run directory: FLAGS, HISTORY and BACKUP as training's, and these.
BACKBONE_WEIGHTS = "backbone.weights.h5"  # the pretrained backbone alone, for xray-train --weights
BACKBONE_INFO = "backbone.json"  # which backbone, pretrained how; written last: the pretraining has finished
PRETRAIN_IMAGES = "images.csv"  # every image file pretrained on

# What each file is, for the message of a write that fails; other files by their ending.
_WHAT = {FLAGS: "the run's settings", CLASSES: "the class names", HISTORY: "the epoch history",
         METRICS: "the run's metrics", MODEL: "the kept model", SAVED_MODEL: "the SavedModel export",
         ONNX: "the ONNX export", TFLITE: "the LiteRT export",
         SKIPPED_IMAGES: "the list of skipped images", SPLITS_CSV: "every image's split",
         CALIBRATION: "the fitted temperature", OPERATING_POINTS: "the chosen thresholds", REPORT: "the report page",
         BACKBONE_WEIGHTS: "the pretrained backbone", BACKBONE_INFO: "the backbone's description",
         PRETRAIN_IMAGES: "the list of images pretrained on"}
_WHAT_BY_ENDING = {".npz": "an epoch backup", ".png": "a figure", ".csv": "a table", ".json": "a report",
                   ".keras": "a model", ".html": "a page"}


def _what(path: str) -> str:
    name = os.path.basename(path)
    return _WHAT.get(name) or _WHAT_BY_ENDING.get(os.path.splitext(name)[1], "a file")


HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def metrics_of_split(split: str) -> str:
    """``xray-evaluate``'s report of one split; it takes precedence over ``metrics.json``'s."""
    return f"metrics_{split}.json"


def predictions_of_split(split: str) -> str:
    return f"predictions_{split}.csv"


def confusion_matrix_png(split: str) -> str:
    return f"confusion_matrix_{split}.png"


def roc_png(split: str) -> str:
    return f"roc_{split}.png"


def pr_png(split: str) -> str:
    return f"pr_{split}.png"


def reliability_png(split: str) -> str:
    return f"reliability_{split}.png"


class RunError(ValueError):
    """A run directory lacks a file, or a file cannot be read; the message names the file."""


def create(output_dir: str, run_name: str) -> str:
    """Create and return ``output_dir/run_name``, adding ``-2``, ``-3`` ... if that name is taken."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise RunError(f"{output_dir}: cannot be created ({error.strerror}).") from None
    for attempt in range(1, 10_000):
        path = os.path.join(output_dir, run_name if attempt == 1 else f"{run_name}-{attempt}")
        try:
            os.mkdir(path)  # atomic: two runs starting together never share a directory
            return path
        except FileExistsError:
            continue
    raise RunError(f"Too many runs named {run_name!r} in {output_dir}.")


def start_run(config: TrainConfig, index: DataIndex, skipped: Mapping[str, str]) -> str:
    """A new run directory holding the run's settings, class names, every image's split and the skipped files.

    ``flags.txt`` names the directory actually created (``-2`` suffix included), so
    ``--flagfile=RUN/flags.txt --resume`` finds it.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = create(config.output_dir, config.run_name or f"{config.model}_{config.loss}_{config.task}_{stamp}")
    own_config = dataclasses.replace(config, run_name=os.path.basename(run_dir))
    write_text(os.path.join(run_dir, FLAGS), own_config.to_flagfile())
    write_json(os.path.join(run_dir, CLASSES), list(index.class_names))
    splits = index.frame[["path", "label", "split", "patient"]].rename(columns={"label": "class"})
    write_text(os.path.join(run_dir, SPLITS_CSV), splits.to_csv(index=False))
    if skipped:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(skipped.items()))
        write_text(os.path.join(run_dir, SKIPPED_IMAGES), buffer.getvalue())
    return run_dir


def run_to_resume(config: TrainConfig, finished: str = METRICS) -> str:
    """The run directory ``config.resume`` continues, once it is known that it can and should be continued.

    ``config`` is a training or a pretraining config, whose run has ended once it holds ``finished``
    (``metrics.json``; ``backbone.json`` for xray-pretrain); the run's ``flags.txt`` is read as that type.
    """
    run_dir = os.path.join(config.output_dir, config.run_name)
    flags_path = os.path.join(run_dir, FLAGS)
    if not os.path.isfile(flags_path):
        raise RunError(f"--resume: {run_dir} is not a run directory (no {FLAGS} there); nothing to resume.")
    if os.path.isfile(os.path.join(run_dir, finished)):
        raise RunError(f"--resume: {run_dir} has finished (it has {finished}); start a new run instead.")
    try:
        started = type(config).from_flagfile(flags_path)
    except ValueError as error:
        raise RunError(f"{flags_path}: {error}") from None
    changed = started.changed_settings(config)
    if changed:
        listing = "; ".join(f"--{name} was {started}, now {now}" for name, (started, now) in sorted(changed.items()))
        raise RunError(f"--resume: {run_dir} was started with other settings ({listing}). A run continues "
                       f"only with its own settings: --flagfile={flags_path} --resume")
    return run_dir


def _temporary_beside(path: str) -> str:
    """An unused name in ``path``'s folder that keeps its ending, from which Keras and NumPy pick a format."""
    directory, name = os.path.split(os.path.abspath(path))
    ending = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp{ending}")


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp(\..*)?")  # the names _temporary_beside gives


@contextlib.contextmanager
def writing(path: str, what: str | None = None) -> Iterator[None]:
    """Raise an OSError inside as one RunError line naming ``path`` and ``what`` is written there.

    E.g. ``cannot write out.csv (the predictions CSV): No space left on device.``, where the error
    alone would name a temporary file, or nothing. ``what`` defaults to what the run file is.
    """
    try:
        yield
    except OSError as error:
        raise RunError(f"cannot write {path} ({what or _what(path)}): {error.strerror or error}.") from error


def write_atomic(path: str, write: Callable[[str], None], directory: bool = False) -> None:
    """``write(temporary)`` beside ``path``, then rename it onto ``path``.

    With ``directory`` the temporary is an empty folder for ``write`` to fill (a SavedModel);
    otherwise ``write`` creates the temporary file itself. A failure removes the temporary and
    leaves ``path`` as it was; an OS error (a full disk, no permission, a folder where the file
    goes) is raised by ``writing``, naming ``path``, not the temporary nobody knows of.
    """
    temporary = _temporary_beside(path)
    with writing(path):
        try:
            if directory:
                os.mkdir(temporary, 0o777)
            write(temporary)
            os.replace(temporary, path)
        except BaseException:
            if os.path.isdir(temporary) and not os.path.islink(temporary):
                shutil.rmtree(temporary, ignore_errors=True)
            elif os.path.lexists(temporary):
                os.remove(temporary)
            raise


def remove_temporaries(folder: str) -> list[str]:
    """Delete what killed writes left in ``folder`` and its sub-folders (``--resume`` starts with it)."""
    removed = []
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            if _TEMPORARY.fullmatch(name):
                path = os.path.join(root, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                    folders.remove(name)
                else:
                    os.remove(path)
                removed.append(path)
    return removed


def write_bytes(path: str, content: bytes) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "xb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomic(path, write)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, payload: object) -> None:
    write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def read_json(path: str) -> object:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file.") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not valid JSON ({error}).") from None


def read_config(run_dir: str) -> TrainConfig:
    """The settings the run was started with (``flags.txt``)."""
    path = os.path.join(run_dir, FLAGS)
    if not os.path.isfile(path):
        raise RunError(f"{path}: no such file (not a run directory of xray-train?).")
    try:
        return TrainConfig.from_flagfile(path)
    except ValueError as error:
        raise RunError(f"{path}: {error}") from None


def read_classes(run_dir: str) -> list[str]:
    return list(read_json(os.path.join(run_dir, CLASSES)))


def read_metrics(run_dir: str) -> dict:
    return dict(read_json(os.path.join(run_dir, METRICS)))


def read_history(run_dir: str) -> pd.DataFrame:
    """``history.csv``: one row per epoch with at least ``HISTORY_COLUMNS``."""
    return read_csv_checked(os.path.join(run_dir, HISTORY), HISTORY_COLUMNS, error=RunError, rows="epochs")


PREDICTION_COLUMNS = ("file", "true_class", "predicted_class")


def read_predictions(run_dir: str, split: str, probability_columns: Sequence[str]) -> pd.DataFrame:
    """``predictions_<split>.csv`` as ``xray-evaluate`` writes it: ``PREDICTION_COLUMNS``, the ``p_<class>``
    columns, then ``patient`` (as text) and the ``flag_<class>`` columns where present.

    ``probability_columns`` are those the caller reads (``inference.probability_column`` of its
    classes: naming them needs Keras, which this module does not import). A file that is missing,
    lacks one of the columns named here, or names an image twice raises RunError naming the file.
    """
    path = os.path.join(run_dir, predictions_of_split(split))
    table = read_csv_checked(path, [*PREDICTION_COLUMNS, *probability_columns], error=RunError, rows="predictions")
    repeated = table["file"][table["file"].duplicated()]
    if not repeated.empty:
        raise RunError(f"{path}: {repeated.iloc[0]} appears more than once.")

    def starting(prefix: str) -> list[str]:
        return [column for column in table.columns if column.startswith(prefix)]

    patient = ["patient"] if "patient" in table.columns else []
    frame = table[[*PREDICTION_COLUMNS, *starting("p_"), *patient, *starting("flag_")]]
    # Text, so that one patient is one group in any file: pandas reads a column of digits as numbers.
    return frame.assign(patient=frame["patient"].astype(str)) if patient else frame


def split_reports(run_dir: str) -> dict[str, tuple[dict, str]]:
    """``split -> (classification report, file it came from)`` for the run's kept model.

    ``metrics_<split>.json`` (``xray-evaluate``, possibly on another copy of the data such as the
    full dataset with its TEST split) takes precedence over the split in ``metrics.json``.
    """
    reports = {split: (report, METRICS) for split, report in read_metrics(run_dir).get("splits", {}).items()}
    for split in ("val", "test"):
        path = os.path.join(run_dir, metrics_of_split(split))
        if os.path.isfile(path):
            reports[split] = (read_json(path), metrics_of_split(split))
    return reports


def is_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, METRICS))


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, HISTORY)) or is_finished(path)


def find_runs(paths: Sequence[str]) -> list[str]:
    """Expand each path (a run directory, or a folder whose sub-folders are runs) into run directories."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise RunError(f"{path}: not a directory.")
        if is_run_dir(path):
            runs.append(path)
            continue
        children = sorted(os.path.join(path, name) for name in os.listdir(path))
        found = [child for child in children if os.path.isdir(child) and is_run_dir(child)]
        if not found:
            raise RunError(f"{path}: neither a run directory ({HISTORY}, {METRICS}) nor a folder of runs.")
        runs.extend(found)
    return runs
