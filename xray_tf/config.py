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

from xray_tf.backbones import MODELS  # standard library only, as here

# Each task maps a row's fine class onto one of the task's classes; rows whose fine class is not a
# key are outside the task. The classes' order here is the order of the model's outputs.
FINE_CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")
TASKS: dict[str, dict[str, str]] = {
    "four_class": {name: name for name in FINE_CLASSES},
    "bacteria_vs_virus": {"Bacteria": "Bacteria", "Virus": "Virus"},
    "normal_vs_pneumonia": {"Normal": "Normal", "Bacteria": "Pneumonia", "Virus": "Pneumonia",
                            "COVID-19": "Pneumonia"},
}
LOSSES = ("ce", "focal")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine")  # see xray_tf.optimizers
AUGMENTATIONS = ("paper", "strong")  # see xray_tf.augment
# What decides the kept epoch (and early stopping): the loss is minimised, the others maximised.
SELECT_BY = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_macro_auc")
SAMPLERS = ("balanced", "none")
CLASS_WEIGHTS = ("balanced", "none")
MIXED_PRECISION = ("auto", "off", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")
ON_BAD_IMAGE = ("error", "skip")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")  # see xray_tf.distribution
EVALUATION_SPLITS = ("test", "val")  # what xray-evaluate measures a kept model on
TTA_MODES = ("none", "flip", "flip_rotate")  # test-time augmentation of evaluate and predict; see xray_tf.inference
COMPILATION_CACHE_AUTO, COMPILATION_CACHE_OFF = "auto", "none"  # else a directory; see xray_tf.compile_cache
MIN_IMAGE_SIZE = 32  # the smallest input every backbone of xray_tf.backbones accepts
MAX_IMAGE_SIZE = 2048  # 4x CheXNet's largest published input; one such batch of 32 is 400 MB as float32
DEFAULT_MAX_PIXELS = 100_000_000  # per image, as its header declares: 10000 x 10000, above any detector
DATA_FORMATS = ("auto", "coronahack", "kermany", "folders", "csv", "metadata")  # see xray_tf.layouts
SPLIT_BY = ("patient", "image")  # how the validation split is drawn from TRAIN; see xray_tf.patients
EXPORT_FORMATS = ("saved_model", "onnx", "litert")  # what --export writes beside model.keras; see xray_tf.export

# The paper's flagfiles, the demo's and the recommended recipe's, installed with the package (the
# repository's top-level flags/ folder); ``--experiment=NAME`` reads NAME.cfg from here.
FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")
EXPERIMENTS = ("prce", "prcw", "prfl", "pdcxce", "pdcxfl", "rce", "demo", "recommended")

# May differ when a run is resumed: where it is, how many devices share its (unchanged) batches,
# where its compiled programs are cached, and what it is exported as once trained.
RUN_LOCATION_FIELDS = ("output_dir", "run_name", "resume", "distribution", "compilation_cache", "export")


class ConfigError(ValueError):
    """A setting that cannot work: ``field`` names it, the message says why."""

    def __init__(self, field: str, value: object, problem: str):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}={value!r}: {problem}")

    def as_flag(self) -> str:
        """The message as a command line user reads it, naming ``--field``."""
        return f"--{self.field}={self.value}: {self.problem}"


def setting(default: object, help: str, choices: Iterable[str] | None = None) -> dataclasses.Field:
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (see the README's Training section)."""

    # Data
    data_dir: tuple[str, ...] = setting((), "Dataset folder; give it several times to train on several datasets "
                                        "at once (each one's layout detected, byte-identical copies kept once). "
                                        "Omitted (and no --data_csv): a synthetic dataset is generated once and "
                                        "used, and the run says so loudly.")
    data_format: str = setting("auto", "The layout of every --data_dir: auto detects it (and says why); coronahack "
                               "(Kaggle's CSV), kermany ({train,val,test}/{NORMAL,PNEUMONIA}/), folders (a folder "
                               "per class, optionally in train/val/test folders), csv (a CSV of path,label"
                               "[,split][,patient_id]), metadata (the --extra_data layout).", DATA_FORMATS)
    data_csv: str | None = setting(None, "A CSV of path,label[,split][,patient_id], paths relative to it; a row "
                                   "without a split is a training image. Alone or besides --data_dir.")
    class_names: str | None = setting(None, "Comma-separated classes in the order of the model's outputs, for data "
                                      "whose labels are their own (folders, csv); LABEL=NAME maps a label onto a "
                                      "class (several labels may map onto one); images of labels not named are "
                                      "left out, and counted. Default: the task's classes the data holds, then "
                                      "the other labels in alphabetical order.")
    extra_data: str | None = setting(None, "Folder (metadata.csv with X_ray_image_name,Label and images/, or any "
                                     "--data_format layout) whose images join the training split only (the "
                                     "paper's extra COVID-19 samples).")
    task: str = setting("four_class", "Which classes to tell apart in data labelled with the fine classes "
                        "(coronahack, kermany, metadata); folders and csv data bring their own.", TASKS)
    val_fraction: float = setting(0.1, "Stratified share of TRAIN held out for validation.")
    split_by: str = setting("patient", "patient: a patient's images (the id in the file name, or a patient_id "
                            "column) are all in train or all in val; image: images are split one by one, "
                            "which lets a patient's images leak into validation.", SPLIT_BY)
    seed: int = setting(0, "Seed for the split, sampling, augmentation and initialisation.")
    on_bad_image: str = setting("error", "An image file that cannot be decoded: error stops before training, "
                                "listing every such file; skip trains without them and lists them in the log and "
                                "in RUN/skipped_images.csv.", ON_BAD_IMAGE)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "Refuse, by name and before decoding, any image whose header "
                              "declares more pixels than this (a decoded 16-bit RGBA image costs 8 bytes a pixel).")
    # Input pipeline
    image_size: int = setting(224, f"Images are resized to image_size x image_size ({MIN_IMAGE_SIZE} to "
                              f"{MAX_IMAGE_SIZE}).")
    batch_size: int = setting(32, "Batch size (the global batch, across every device).")
    cache: str = setting("memory", "Where decoded images are cached: memory, none, or a directory.")
    sampler: str = setting("balanced", "balanced: every draw picks each class with equal probability "
                           "(epoch = size of TRAIN).", SAMPLERS)
    class_weight: str = setting("none", "balanced: weight the loss of each class by n / (k * n_class).",
                                CLASS_WEIGHTS)
    rotation_degrees: float = setting(15.0, "Maximum random rotation, in degrees.")
    rotation_prob: float = setting(0.3, "Probability that a training image is rotated.")
    augment: str = setting("paper", "paper: flips and rotation only (the paper's recipe). strong: also random resized "
                           "crops, small translation, scale and shear, brightness, contrast and gamma jitter.",
                           AUGMENTATIONS)
    crop_scale_min: float = setting(0.6, "--augment=strong: a random crop keeps between this share of the image's "
                                    "area and all of it.")
    crop_aspect_max: float = setting(4 / 3, "--augment=strong: a random crop's aspect ratio lies between "
                                     "1/crop_aspect_max and crop_aspect_max.")
    mixup_alpha: float = setting(0.0, "MixUp: each training batch is blended with itself in another order by a "
                                 "weight drawn from Beta(alpha, alpha), labels too (0: off).")
    cutmix_alpha: float = setting(0.0, "CutMix: a box of each training image is pasted from another; labels are "
                                  "mixed by the box's area, drawn from Beta(alpha, alpha) (0: off). With MixUp "
                                  "too, each batch gets one of the two.")
    # Model
    model: str = setting("resnet50", "Backbone (see xray_tf.backbones).", MODELS)
    weights: str = setting("imagenet", "imagenet (Keras download), none, or a Keras weights file for the backbone "
                           "without its top (or torchvision's DenseNet-121 .pth for --model=densenet121).")
    chexnet_weights: str | None = setting(None, "Converted CheXNet weights for --model=densenet_chexnet "
                                          "(xray-convert-chexnet).")
    dropout: float = setting(0.0, "Dropout rate before the classifier.")
    # Loss and optimisation
    loss: str = setting("ce", "ce: categorical cross-entropy; focal: focal loss.", LOSSES)
    focal_gamma: float = setting(2.0, "Focal loss focusing parameter gamma.")
    focal_alpha: str = setting("0.25", "Focal loss alpha: a number, 'balanced', or one comma-separated number "
                               "per class.")
    label_smoothing: float = setting(0.0, "Targets become (1 - s) * one_hot + s / classes, for either loss.")
    optimizer: str = setting("adam", "adam, adamw (Adam with --weight_decay), or sgd (with --momentum).", OPTIMIZERS)
    weight_decay: float = setting(0.0, "Decoupled weight decay: each step shrinks every weight by "
                                  "learning_rate * weight_decay (needed by --optimizer=adamw).")
    momentum: float = setting(0.9, "--optimizer=sgd: momentum.")
    learning_rate: float = setting(1e-3, "Initial learning rate.")
    schedule: str = setting("step", "step: multiply the rate by lr_decay every lr_decay_epochs. cosine: decay it "
                            "along half a cosine from learning_rate to 0 over the epochs after warmup.", SCHEDULES)
    lr_decay: float = setting(0.5, "--schedule=step: factor applied to the learning rate every lr_decay_epochs.")
    lr_decay_epochs: int = setting(10, "--schedule=step: epochs between learning-rate decays.")
    warmup_epochs: int = setting(0, "Epochs whose learning rate rises linearly to learning_rate before the "
                                 "schedule starts.")
    backbone_lr_multiplier: float = setting(1.0, "The backbone learns at this multiple of the learning rate (the "
                                            "head at the full rate), e.g. 0.1 to fine-tune pretrained weights gently.")
    freeze_backbone_epochs: int = setting(0, "Train the head alone (backbone weights and BatchNorm statistics "
                                          "frozen) for this many epochs, then everything.")
    ema_decay: float = setting(0.0, "Keep an exponential moving average of the weights with this decay per step "
                               "(e.g. 0.999); validation, the kept model and evaluation use the average (0: off).")
    epochs: int = setting(20, "Number of epochs.")
    select_by: str = setting("val_loss", "The validation metric whose best epoch becomes model.keras (balanced "
                             "accuracy, macro F1 and macro ROC AUC are computed on the whole validation split "
                             "every epoch).", SELECT_BY)
    early_stopping_patience: int = setting(0, "Stop after this many epochs without a better --select_by value "
                                           "(0: run every epoch).")
    mixed_precision: str = setting("auto", "auto: mixed_bfloat16 when a GPU is present, float32 otherwise.",
                                   MIXED_PRECISION)
    jit_compile: str = setting("auto", "XLA compilation of the train step (auto: Keras decides; off on CPU-only "
                               "TensorFlow).", JIT_COMPILE)
    compilation_cache: str = setting(COMPILATION_CACHE_AUTO, "JAX backend: a directory where compiled XLA programs "
                                     "are kept, so a rerun with the same model and shapes skips compiling. auto: "
                                     "$JAX_COMPILATION_CACHE_DIR if set, else jax-compilation in ~/.cache/xray_tf "
                                     "(or $XRAY_TF_CACHE); none: off.")
    # Several devices or hosts
    distribution: str = setting("none", "none: one device. mirrored: every GPU of this host "
                                "(tf.distribute.MirroredStrategy, or keras.distribution.DataParallel on JAX). "
                                "multi_worker: several hosts, each running this command (TF_CONFIG, or "
                                "KERAS_DISTRIBUTION_* on JAX); only the chief writes the run directory. "
                                "--batch_size stays the global batch.", DISTRIBUTIONS)
    scale_lr_with_batch: bool = setting(False, "Multiply --learning_rate by the number of replicas (the linear "
                                        "scaling rule), for runs that also raise --batch_size that many times.")
    # Output
    output_dir: str = setting("saved_models", "Where run directories are created.")
    run_name: str | None = setting(None, "Name of the run directory (default: model_loss_task_timestamp); an "
                                   "existing name gets a -2, -3 ... suffix, never overwritten.")
    resume: bool = setting(False, "Continue the unfinished run --output_dir/--run_name after its last finished "
                           "epoch, with the settings it was started with (--flagfile=RUN/flags.txt --resume).")
    tensorboard: bool = setting(False, "Write TensorBoard logs (every epoch's metrics and learning rate, a few "
                                "augmented training images) under RUN/tensorboard; viewing them needs the "
                                "tensorboard package (pip install 'xray_tf[tensorboard]').")
    export: str = setting("saved_model", "Comma-separated formats the kept model is exported in, beside "
                          "model.keras: saved_model (RUN/saved_model/, TensorFlow), onnx (RUN/model.onnx, ONNX "
                          "Runtime), litert (RUN/model.tflite, the LiteRT interpreter); onnx and litert need "
                          "pip install 'xray_tf[export]'. Each takes uint8 images and gives probabilities.")
    calibrate: bool = setting(False, "After training, fit one softmax temperature on the validation split and "
                              "store it in the run; evaluate, predict and the exports then apply it.")

    def __post_init__(self) -> None:
        if isinstance(self.data_dir, (str, os.PathLike)):  # TrainConfig(data_dir="coronahack"): one folder
            self.data_dir = (self.data_dir,)
        self.data_dir = tuple(os.fspath(path) for path in self.data_dir or ())

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_choices(self)
        for name in ("epochs", "batch_size", "learning_rate", "lr_decay_epochs", "lr_decay", "backbone_lr_multiplier",
                     "crop_scale_min", "crop_aspect_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "must be positive.")
        for name in ("weight_decay", "warmup_epochs", "freeze_backbone_epochs", "early_stopping_patience",
                     "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0.")
        for name in ("label_smoothing", "ema_decay", "momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, getattr(self, name), "must be in [0, 1).")
        if self.optimizer == "adamw" and self.weight_decay == 0:
            raise ConfigError("weight_decay", self.weight_decay, "--optimizer=adamw needs a positive --weight_decay "
                              "(without it AdamW is Adam).")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", self.warmup_epochs, f"must be fewer than --epochs={self.epochs}.")
        if self.crop_scale_min > 1:
            raise ConfigError("crop_scale_min", self.crop_scale_min, "a share of the image: at most 1.")
        if self.crop_aspect_max < 1:
            raise ConfigError("crop_aspect_max", self.crop_aspect_max, "must be >= 1 (the range is its reciprocal "
                              "to itself).")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError("image_size", self.image_size, f"below {MIN_IMAGE_SIZE}, the backbones' minimum.")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError("image_size", self.image_size, f"above {MAX_IMAGE_SIZE}, the largest size supported.")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", self.max_pixels, "must be positive.")
        if self.run_name is not None:
            check_plain_name("run_name", self.run_name)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "must be strictly between 0 and 1.")
        if not 0.0 <= self.rotation_prob <= 1.0:
            raise ConfigError("rotation_prob", self.rotation_prob, "must be in [0, 1].")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "must be in [0, 1).")
        if self.focal_gamma < 0:
            raise ConfigError("focal_gamma", self.focal_gamma, "must be >= 0.")
        for name, path in [*(("data_dir", path) for path in self.data_dir), ("extra_data", self.extra_data)]:
            if path and not os.path.isdir(path):
                raise ConfigError(name, path, "not a directory.")
        if self.data_csv is not None and not os.path.isfile(self.data_csv):
            raise ConfigError("data_csv", self.data_csv, "no such file.")
        if self.class_names is not None:
            class_name_map(self.class_names)
        export_formats(self.export)
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
        check_writable("output_dir", self.output_dir)
        if self.compilation_cache not in (COMPILATION_CACHE_AUTO, COMPILATION_CACHE_OFF):
            check_writable("compilation_cache", self.compilation_cache)

    def changed_settings(self, other: TrainConfig) -> dict[str, tuple[object, object]]:
        """``{field: (ours, theirs)}`` where the two configs train differently (location fields aside)."""
        return {field.name: (getattr(self, field.name), getattr(other, field.name))
                for field in dataclasses.fields(self)
                if field.name not in RUN_LOCATION_FIELDS and getattr(self, field.name) != getattr(other, field.name)}

    def to_flagfile(self) -> str:
        """Every setting that is not None as ``--name=value`` lines: ``flags.txt``, reusable as ``--flagfile``."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            lines += [f"--{field.name}={item}\n" for item in (value if isinstance(value, tuple) else [value])
                      if item is not None]
        return "".join(lines)

    @classmethod
    def from_args(cls, args: Iterable[str], base_dir: str = ".") -> TrainConfig:
        """The config that ``--name=value`` arguments (flagfiles and ``--experiment`` included) describe.

        Later values win, as on a command line; fields not named keep their defaults.
        """
        expanded = expand_flagfiles(list(args), base_dir)
        values = flag_values(expanded, "arguments")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(unknown[0], values[unknown[0]], "no such training setting.")
        return cls(**{name: _every_value(expanded, name) if isinstance(fields[name].default, tuple)
                      else _typed(fields[name], text) for name, text in values.items()})

    @classmethod
    def from_flagfile(cls, path: str) -> TrainConfig:
        """The config a flagfile (a run's ``flags.txt``, or one in ``flags/``) describes."""
        return cls.from_args([f"--flagfile={path}"])


def class_name_map(spec: str) -> dict[str, str]:
    """``{label: class}`` of ``--class_names`` (``A,B=Name,C=Name``), in the order of the model's outputs."""
    mapping = {}
    for item in spec.split(","):
        label, equals, name = (part.strip() for part in item.partition("="))
        name = name if equals else label
        if not label or not name:
            raise ConfigError("class_names", spec, f"{item.strip()!r} is no class: expected NAME or LABEL=NAME, "
                              "comma-separated.")
        if label in mapping:
            raise ConfigError("class_names", spec, f"label {label!r} is named twice.")
        mapping[label] = name
    return mapping


def export_formats(spec: str, field: str = "export") -> tuple[str, ...]:
    """The formats ``--export`` (or ``field``) names (``saved_model,onnx``), each once, in their order."""
    formats = tuple(dict.fromkeys(item.strip() for item in spec.split(",")))
    unknown = [name for name in formats if name not in EXPORT_FORMATS]
    if unknown:
        raise ConfigError(field, spec, f"{', '.join(map(repr, unknown))}: no export format; choose from "
                          f"{', '.join(EXPORT_FORMATS)}, comma-separated.")
    return formats


def _every_value(args: list[str], name: str) -> tuple[str, ...]:
    """Each value of a setting given once per value (``--data_dir=A --data_dir=B``), in order."""
    return tuple(arg.partition("=")[2] for arg in args if arg.startswith(f"--{name}="))


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


def check_choices(config: object) -> None:
    """Raise ConfigError for the first field of the dataclass ``config`` outside its choices or not finite."""
    for field in dataclasses.fields(config):
        value, choices = getattr(config, field.name), field.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(field.name, value, f"not one of {', '.join(choices)}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(field.name, value, "must be a finite number.")


def check_plain_name(field: str, name: str) -> None:
    """Raise ConfigError unless ``name`` is one plain file name, so that it stays inside its folder."""
    if name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name:  # basename: every separator
        raise ConfigError(field, name, "must be a plain name: no path separators, not '.' or '..'.")


def check_writable(field: str, directory: str) -> None:
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
