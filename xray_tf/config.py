"""One explicit configuration object for a training run.

The CLI turns its flags into a ``TrainConfig`` (the field names are the flag names and the field
defaults are the flag defaults); library code receives this object or plain arguments and never
reads absl ``FLAGS``. ``validate`` checks every value up front, so bad input fails before any
data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import os

from xray_tf import compile_cache, data, losses, models

SAMPLERS = ("balanced", "none")
CLASS_WEIGHTS = ("balanced", "none")
MIXED_PRECISION = ("auto", "off", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")
ON_BAD_IMAGE = ("error", "skip")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")  # see xray_tf.distribution
MIN_IMAGE_SIZE = 32  # the smallest input Keras' ResNet50 and DenseNet121 accept


@dataclasses.dataclass
class TrainConfig:
    # Data
    data_dir: str | None = None  # None: a synthetic dataset, said loudly in the log and metrics
    extra_data: str | None = None
    task: str = "four_class"
    val_fraction: float = 0.1
    seed: int = 0
    on_bad_image: str = "error"
    # Input pipeline
    image_size: int = 224
    batch_size: int = 32
    cache: str = "memory"
    sampler: str = "balanced"
    class_weight: str = "none"
    rotation_degrees: float = 15.0
    rotation_prob: float = 0.3
    # Model
    model: str = "resnet50"
    weights: str = "imagenet"
    chexnet_weights: str | None = None
    dropout: float = 0.0
    # Loss and optimisation
    loss: str = "ce"
    focal_gamma: float = 2.0
    focal_alpha: str = "0.25"
    learning_rate: float = 1e-3
    lr_decay: float = 0.5
    lr_decay_epochs: int = 10
    epochs: int = 20
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    compilation_cache: str = "auto"  # JAX backend: see xray_tf.compile_cache
    # Several devices or hosts
    distribution: str = "none"
    scale_lr_with_batch: bool = False
    # Output
    output_dir: str = "saved_models"
    run_name: str | None = None
    resume: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first flag whose value cannot work."""
        choices = {
            "task": tuple(data.TASKS),
            "sampler": SAMPLERS,
            "class_weight": CLASS_WEIGHTS,
            "model": models.MODEL_NAMES,
            "loss": losses.LOSS_NAMES,
            "mixed_precision": MIXED_PRECISION,
            "jit_compile": JIT_COMPILE,
            "on_bad_image": ON_BAD_IMAGE,
            "distribution": DISTRIBUTIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                    "lr_decay_epochs": self.lr_decay_epochs, "lr_decay": self.lr_decay}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"--{name}={value} must be positive.")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image_size={self.image_size} is below {MIN_IMAGE_SIZE}, the backbones' minimum.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction={self.val_fraction} must be strictly between 0 and 1.")
        if not 0.0 <= self.rotation_prob <= 1.0:
            raise ValueError(f"--rotation_prob={self.rotation_prob} must be in [0, 1].")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout={self.dropout} must be in [0, 1).")
        if self.focal_gamma < 0:
            raise ValueError(f"--focal_gamma={self.focal_gamma} must be >= 0.")
        for name in ("data_dir", "extra_data"):
            path = getattr(self, name)
            if path and not os.path.isdir(path):
                raise ValueError(f"--{name}={path!r} is not a directory.")
        if self.model == "densenet_chexnet":
            if not self.chexnet_weights:
                raise ValueError("--model=densenet_chexnet needs --chexnet_weights=PATH (see python -m xray_tf.chexnet).")
            if not os.path.isfile(self.chexnet_weights):
                raise ValueError(f"--chexnet_weights={self.chexnet_weights!r} does not exist.")
        if self.weights not in ("imagenet", "none") and not os.path.isfile(self.weights):
            raise ValueError(f"--weights={self.weights!r}: expected 'imagenet', 'none' or an existing weights file.")
        if self.resume and not self.run_name:
            raise ValueError("--resume needs --run_name=NAME, the run directory in --output_dir to continue.")
        _check_writable("output_dir", self.output_dir)
        if self.compilation_cache not in (compile_cache.AUTO, compile_cache.OFF):
            _check_writable("compilation_cache", self.compilation_cache)

    def to_flags(self) -> dict[str, str]:
        """Every setting that is not None, as flag name -> value as written on a command line."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: f"{value}" for name, value in values.items() if value is not None}

    def to_flagfile(self) -> str:
        """Every setting as ``--name=value`` lines, reusable as ``--flagfile``."""
        return "".join(f"--{name}={value}\n" for name, value in self.to_flags().items())


def _check_writable(flag: str, directory: str) -> None:
    """Raise ValueError naming ``--flag`` unless ``directory`` exists writable or could be created.

    Checked up front so that hours of data checking and model building do not end in a failed
    ``mkdir``; the directory itself is created later (a run directory atomically).
    """
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--{flag}={directory!r} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag}={directory!r} is not writable ({existing}).")
