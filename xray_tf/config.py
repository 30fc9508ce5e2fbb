"""One explicit configuration object for a training run, and the one reader of flagfiles.

A ``TrainConfig`` field is a setting: its name is the flag name, its default the flag default and
its ``help`` the flag's help, so the command line (``xray_tf.cli.train``) is generated from this
class and cannot drift from it. Library code receives the object and never reads absl ``FLAGS``;
``validate`` checks every value and every combination up front, so bad input fails before any
data is read. Errors name the field (``ConfigError``); the CLI renders them as ``--field``.

Only the standard library is imported: ``--help`` and the reporting scripts load this module
without Keras or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable

# Each task maps a row's fine class onto one of the task's classes; rows whose fine class is not a
# key are outside the task. The classes' order here is the order of the model's outputs.
FINE_CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")
TASKS: dict[str, dict[str, str]] = {
    "four_class": {name: name for name in FINE_CLASSES},
    "bacteria_vs_virus": {"Bacteria": "Bacteria", "Virus": "Virus"},
    "normal_vs_pneumonia": {"Normal": "Normal", "Bacteria": "Pneumonia", "Virus": "Pneumonia",
                            "COVID-19": "Pneumonia"},
}
MODELS = ("resnet50", "densenet121", "densenet_chexnet")
LOSSES = ("ce", "focal")
SAMPLERS = ("balanced", "none")
CLASS_WEIGHTS = ("balanced", "none")
MIXED_PRECISION = ("auto", "off", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")
ON_BAD_IMAGE = ("error", "skip")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")  # see xray_tf.distribution
EVALUATION_SPLITS = ("test", "val")  # what xray-evaluate measures a kept model on
TTA_MODES = ("none", "flip", "flip_rotate")  # test-time augmentation of evaluate and predict; see xray_tf.inference
COMPILATION_CACHE_AUTO, COMPILATION_CACHE_OFF = "auto", "none"  # else a directory; see xray_tf.compile_cache
MIN_IMAGE_SIZE = 32  # the smallest input Keras' ResNet50 and DenseNet121 accept
MAX_IMAGE_SIZE = 2048  # 4x CheXNet's largest published input; one such batch of 32 is 400 MB as float32
DEFAULT_MAX_PIXELS = 100_000_000  # per image, as its header declares: 10000 x 10000, above any detector
SPLIT_BY = ("patient", "image")  # how the validation split is drawn from TRAIN; see xray_tf.patients

# The paper's flagfiles and the demo's, installed with the package (the repository's top-level
# flags/ folder); ``--experiment=NAME`` reads NAME.cfg from here.
FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")
EXPERIMENTS = ("prce", "prcw", "prfl", "pdcxce", "pdcxfl", "rce", "demo")

# May differ when a run is resumed: where it is, how many devices share its (unchanged) batches,
# and where its compiled programs are cached.
RUN_LOCATION_FIELDS = ("output_dir", "run_name", "resume", "distribution", "compilation_cache")


class ConfigError(ValueError):
    """A setting that cannot work: ``field`` names it, the message says why."""

    def __init__(self, field: str, value: object, problem: str):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}={value!r}: {problem}")

    def as_flag(self) -> str:
        """The message as a command line user reads it, naming ``--field``."""
        return f"--{self.field}={self.value}: {self.problem}"


def _setting(default: object, help: str, choices: Iterable[str] | None = None) -> dataclasses.Field:
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (see the README's Training section)."""

    # Data
    data_dir: str | None = _setting(None, "CoronaHack folder (holding Chest_xray_Corona_Metadata.csv). Omitted: a "
                                    "synthetic dataset is generated once and used, and the run says so loudly.")
    extra_data: str | None = _setting(None, "Folder with metadata.csv (X_ray_image_name,Label) and images/ whose "
                                      "images join the training split only (the paper's extra COVID-19 samples).")
    task: str = _setting("four_class", "Which classes to tell apart.", TASKS)
    val_fraction: float = _setting(0.1, "Stratified share of TRAIN held out for validation.")
    split_by: str = _setting("patient", "patient: a patient's images (the id in the file name, or a patient_id "
                             "column) are all in train or all in val; image: images are split one by one, "
                             "which lets a patient's images leak into validation.", SPLIT_BY)
    seed: int = _setting(0, "Seed for the split, sampling, augmentation and initialisation.")
    on_bad_image: str = _setting("error", "An image file that cannot be decoded: error stops before training, "
                                 "listing every such file; skip trains without them and lists them in the log and "
                                 "in RUN/skipped_images.csv.", ON_BAD_IMAGE)
    max_pixels: int = _setting(DEFAULT_MAX_PIXELS, "Refuse, by name and before decoding, any image whose header "
                               "declares more pixels than this (a decoded 16-bit RGBA image costs 8 bytes a pixel).")
    # Input pipeline
    image_size: int = _setting(224, f"Images are resized to image_size x image_size ({MIN_IMAGE_SIZE} to "
                               f"{MAX_IMAGE_SIZE}).")
    batch_size: int = _setting(32, "Batch size (the global batch, across every device).")
    cache: str = _setting("memory", "Where decoded images are cached: memory, none, or a directory.")
    sampler: str = _setting("balanced", "balanced: every draw picks each class with equal probability "
                            "(epoch = size of TRAIN).", SAMPLERS)
    class_weight: str = _setting("none", "balanced: weight the loss of each class by n / (k * n_class).",
                                 CLASS_WEIGHTS)
    rotation_degrees: float = _setting(15.0, "Maximum random rotation, in degrees.")
    rotation_prob: float = _setting(0.3, "Probability that a training image is rotated.")
    # Model
    model: str = _setting("resnet50", "Backbone.", MODELS)
    weights: str = _setting("imagenet", "imagenet (Keras download), none, or a Keras weights file for the backbone "
                            "without its top (or torchvision's DenseNet-121 .pth for --model=densenet121).")
    chexnet_weights: str | None = _setting(None, "Converted CheXNet weights for --model=densenet_chexnet "
                                           "(xray-convert-chexnet).")
    dropout: float = _setting(0.0, "Dropout rate before the classifier.")
    # Loss and optimisation
    loss: str = _setting("ce", "ce: categorical cross-entropy; focal: focal loss.", LOSSES)
    focal_gamma: float = _setting(2.0, "Focal loss focusing parameter gamma.")
    focal_alpha: str = _setting("0.25", "Focal loss alpha: a number, 'balanced', or one comma-separated number "
                                "per class.")
    learning_rate: float = _setting(1e-3, "Initial Adam learning rate.")
    lr_decay: float = _setting(0.5, "Factor applied to the learning rate every lr_decay_epochs.")
    lr_decay_epochs: int = _setting(10, "Epochs between learning-rate decays.")
    epochs: int = _setting(20, "Number of epochs.")
    mixed_precision: str = _setting("auto", "auto: mixed_bfloat16 when a GPU is present, float32 otherwise.",
                                    MIXED_PRECISION)
    jit_compile: str = _setting("auto", "XLA compilation of the train step (auto: Keras decides; off on CPU-only "
                                "TensorFlow).", JIT_COMPILE)
    compilation_cache: str = _setting(COMPILATION_CACHE_AUTO, "JAX backend: a directory where compiled XLA programs "
                                      "are kept, so a rerun with the same model and shapes skips compiling. auto: "
                                      "$JAX_COMPILATION_CACHE_DIR if set, else jax-compilation in ~/.cache/xray_tf "
                                      "(or $XRAY_TF_CACHE); none: off.")
    # Several devices or hosts
    distribution: str = _setting("none", "none: one device. mirrored: every GPU of this host "
                                 "(tf.distribute.MirroredStrategy, or keras.distribution.DataParallel on JAX). "
                                 "multi_worker: several hosts, each running this command (TF_CONFIG, or "
                                 "KERAS_DISTRIBUTION_* on JAX); only the chief writes the run directory. "
                                 "--batch_size stays the global batch.", DISTRIBUTIONS)
    scale_lr_with_batch: bool = _setting(False, "Multiply --learning_rate by the number of replicas (the linear "
                                         "scaling rule), for runs that also raise --batch_size that many times.")
    # Output
    output_dir: str = _setting("saved_models", "Where run directories are created.")
    run_name: str | None = _setting(None, "Name of the run directory (default: model_loss_task_timestamp); an "
                                    "existing name gets a -2, -3 ... suffix, never overwritten.")
    resume: bool = _setting(False, "Continue the unfinished run --output_dir/--run_name after its last finished "
                            "epoch, with the settings it was started with (--flagfile=RUN/flags.txt --resume).")
    calibrate: bool = _setting(False, "After training, fit one softmax temperature on the validation split and "
                               "store it in the run; evaluate, predict and the SavedModel then apply it.")

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        for field in dataclasses.fields(self):
            value, choices = getattr(self, field.name), field.metadata["choices"]
            if choices is not None and value not in choices:
                raise ConfigError(field.name, value, f"not one of {', '.join(choices)}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(field.name, value, "must be a finite number.")
        for name in ("epochs", "batch_size", "learning_rate", "lr_decay_epochs", "lr_decay"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "must be positive.")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError("image_size", self.image_size, f"below {MIN_IMAGE_SIZE}, the backbones' minimum.")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError("image_size", self.image_size, f"above {MAX_IMAGE_SIZE}, the largest size supported.")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", self.max_pixels, "must be positive.")
        if self.run_name is not None:
            _check_plain_name("run_name", self.run_name)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "must be strictly between 0 and 1.")
        if not 0.0 <= self.rotation_prob <= 1.0:
            raise ConfigError("rotation_prob", self.rotation_prob, "must be in [0, 1].")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "must be in [0, 1).")
        if self.focal_gamma < 0:
            raise ConfigError("focal_gamma", self.focal_gamma, "must be >= 0.")
        for name in ("data_dir", "extra_data"):
            path = getattr(self, name)
            if path and not os.path.isdir(path):
                raise ConfigError(name, path, "not a directory.")
        if self.model == "densenet_chexnet":
            if not self.chexnet_weights:
                raise ConfigError("chexnet_weights", None, "--model=densenet_chexnet needs the converted CheXNet "
                                  "weights (xray-convert-chexnet).")
            if not os.path.isfile(self.chexnet_weights):
                raise ConfigError("chexnet_weights", self.chexnet_weights, "no such file.")
        if self.weights not in ("imagenet", "none") and not os.path.isfile(self.weights):
            raise ConfigError("weights", self.weights, "expected 'imagenet', 'none' or an existing weights file.")
        if self.resume and not self.run_name:
            raise ConfigError("run_name", None, "--resume needs the name of the run directory in --output_dir.")
        _check_writable("output_dir", self.output_dir)
        if self.compilation_cache not in (COMPILATION_CACHE_AUTO, COMPILATION_CACHE_OFF):
            _check_writable("compilation_cache", self.compilation_cache)

    def changed_settings(self, other: TrainConfig) -> dict[str, tuple[object, object]]:
        """``{field: (ours, theirs)}`` where the two configs train differently (location fields aside)."""
        return {field.name: (getattr(self, field.name), getattr(other, field.name))
                for field in dataclasses.fields(self)
                if field.name not in RUN_LOCATION_FIELDS and getattr(self, field.name) != getattr(other, field.name)}

    def to_flagfile(self) -> str:
        """Every setting that is not None as ``--name=value`` lines: ``flags.txt``, reusable as ``--flagfile``."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return "".join(f"--{name}={value}\n" for name, value in values.items() if value is not None)

    @classmethod
    def from_args(cls, args: Iterable[str], base_dir: str = ".") -> TrainConfig:
        """The config that ``--name=value`` arguments (flagfiles and ``--experiment`` included) describe.

        Later values win, as on a command line; fields not named keep their defaults.
        """
        values = flag_values(expand_flagfiles(list(args), base_dir), "arguments")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(unknown[0], values[unknown[0]], "no such training setting.")
        return cls(**{name: _typed(fields[name], text) for name, text in values.items()})

    @classmethod
    def from_flagfile(cls, path: str) -> TrainConfig:
        """The config a flagfile (a run's ``flags.txt``, or one in ``flags/``) describes."""
        return cls.from_args([f"--flagfile={path}"])


def _typed(field: dataclasses.Field, text: str) -> object:
    """A flag's text as the field's type (the type of its default; str where the default is None)."""
    kind = type(field.default) if field.default is not None else str
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(field.name, text, "expected true or false.")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(field.name, text, f"expected a{'n' if kind is int else ''} {kind.__name__}.") from None


def experiment_flagfile(name: str) -> str:
    """The installed flagfile of ``--experiment=name`` (a paper experiment, or ``demo``)."""
    if name not in EXPERIMENTS:
        raise ConfigError("experiment", name, f"not one of {', '.join(EXPERIMENTS)}.")
    return os.path.join(FLAGS_DIR, f"{name}.cfg")


def expand_flagfiles(args: list[str], base_dir: str = ".") -> list[str]:
    """``args`` with each ``--flagfile=PATH`` and ``--experiment=NAME`` replaced by that file's flags.

    A relative PATH is read from ``base_dir`` (the working directory on a command line); the
    includes of a flagfile are read relative to that flagfile, so ``flags/prfl.cfg`` finds
    ``common_paper.cfg`` beside it from any directory. Comments and blank lines are dropped; an
    argument ``--`` ends the flags and is kept with what follows.
    """
    expanded = []
    for position, arg in enumerate(args):
        if arg == "--":
            return expanded + args[position:]
        name, _, value = arg.partition("=")
        if name == "--experiment":
            path = experiment_flagfile(value)
        elif name == "--flagfile":
            path = os.path.join(base_dir, os.path.expanduser(value))
        else:
            expanded.append(arg)
            continue
        try:
            with open(path) as handle:
                lines = [line.strip() for line in handle]
        except OSError as error:
            raise ConfigError(name[2:], value, f"cannot be read ({error.strerror}).") from None
        lines = [line for line in lines if line and not line.startswith("#")]
        expanded += expand_flagfiles(lines, os.path.dirname(path))
    return expanded


def flag_values(args: Iterable[str], source: str) -> dict[str, str]:
    """``{name: value}`` of ``--name=value`` arguments (``--name`` is true, ``--noname`` false); later wins."""
    values = {}
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError("flagfile", source, f"expected --name=value, got {arg!r}.")
        name, equals, value = arg[2:].partition("=")
        if not equals:
            name, value = (name[2:], "false") if name.startswith("no") and name[2:] else (name, "true")
        values[name] = value
    return values


def _check_plain_name(field: str, name: str) -> None:
    """Raise ConfigError unless ``name`` is one plain file name, so that it stays inside its folder."""
    if name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name:  # basename: every separator
        raise ConfigError(field, name, "must be a plain name: no path separators, not '.' or '..'.")


def _check_writable(field: str, directory: str) -> None:
    """Raise ConfigError unless ``directory`` exists writable or could be created.

    Checked up front so that hours of data checking and model building do not end in a failed
    ``mkdir``; the directory itself is created later (a run directory atomically).
    """
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(field, directory, f"cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, directory, f"not writable ({existing}).")
