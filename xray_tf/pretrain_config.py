"""The settings of a self-supervised pretraining run (``xray-pretrain``), as ``config.TrainConfig`` is training's.

A field is a flag (name, default, help, choices), so ``xray_tf.cli.pretrain`` is generated from this
class; ``validate`` checks every value up front and raises ``ConfigError`` naming the field. The
standard library only, like ``config``: ``--help`` loads no Keras.
"""

from __future__ import annotations

import dataclasses
import math
import os

from xray_tf.backbones import MODELS
from xray_tf.config import (
    DATA_FORMATS,
    DEFAULT_MAX_PIXELS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    ON_BAD_IMAGE,
    ConfigError,
    TrainConfig,
    check_choices,
    check_plain_name,
    check_writable,
    setting,
)

SSL_METHODS = ("vicreg", "simsiam")  # ssl_losses.METHODS, named here without loading Keras
# Every backbone the classifier builds from a weights file; CheXNet's comes converted from PyTorch.
PRETRAIN_MODELS = tuple(name for name in MODELS if name != "densenet_chexnet")
IMAGE_FORMATS = ("auto", "images", *(name for name in DATA_FORMATS if name != "auto"))
SCHEDULES = ("cosine", "constant")
PRETRAIN_PRECISION = ("auto", "off", "mixed_bfloat16")


@dataclasses.dataclass
class PretrainConfig:
    """Every setting of a pretraining run (README, "Self-supervised pretraining")."""

    images: tuple[str, ...] = setting((), "A folder of images (searched like xray-predict does), a dataset folder in "
                                      "any layout the trainer reads, a CSV with a path column, or an image file; "
                                      "give it several times. Labels are never read; a dataset's test split is "
                                      "left out.")
    data_format: str = setting("auto", "How each --images folder is read: auto (a dataset layout if it holds one, "
                               "else every image file under it), images (every image file under it), or one "
                               "layout of xray-train's --data_format.", IMAGE_FORMATS)
    on_bad_image: str = setting("error", "An image file that cannot be decoded: error stops before pretraining, "
                                "listing every such file; skip pretrains without them.", ON_BAD_IMAGE)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "Refuse any image whose header declares more pixels than this.")
    cache: str = setting("memory", "Where the decoded images are kept: memory, or a directory (a memory-mapped "
                         "file, for more images than RAM holds).")
    model: str = setting("resnet50", "Backbone to pretrain (the classifier's, see xray_tf.backbones).",
                         PRETRAIN_MODELS)
    weights: str = setting("none", "Starting weights: none (random), imagenet, or a backbone weights file.")
    method: str = setting("vicreg", "vicreg or simsiam: both work at small batches (xray_tf.ssl_losses).",
                          SSL_METHODS)
    embedding_dim: int = setting(1024, "Width of the projector's layers (and of SimSiam's predictor output).")
    image_size: int = setting(224, f"Images are resized to image_size x image_size ({MIN_IMAGE_SIZE} to "
                              f"{MAX_IMAGE_SIZE}).")
    batch_size: int = setting(64, "Images per batch (each gives two views).")
    epochs: int = setting(100, "Passes over the images.")
    learning_rate: float = setting(1e-3, "Adam's learning rate (after warmup).")
    weight_decay: float = setting(1e-6, "Decoupled weight decay (AdamW); 0: Adam.")
    schedule: str = setting("cosine", "cosine: half a cosine from learning_rate to 0 over the epochs after warmup; "
                            "constant: learning_rate throughout.", SCHEDULES)
    warmup_epochs: int = setting(0, "Epochs whose rate rises linearly to learning_rate first.")
    crop_scale_min: float = setting(0.35, "A view's random crop keeps between this share of the image's area and "
                                    "all of it.")
    rotation_degrees: float = setting(10.0, "A view is rotated by up to this many degrees either way.")
    blur_prob: float = setting(0.5, "Probability that a view is blurred (Gaussian, sigma 0.1 to 2 px at 224 px).")
    seed: int = setting(0, "Seed of the initialisation, the order of the images and every view.")
    mixed_precision: str = setting("auto", "auto: mixed_bfloat16 when a GPU is present, float32 otherwise.",
                                   PRETRAIN_PRECISION)
    output_dir: str = setting("saved_models", "Where run directories are created.")
    run_name: str | None = setting(None, "Name of the run directory (default: pretrain_model_method_timestamp); an "
                                   "existing name gets a -2, -3 ... suffix.")
    resume: bool = setting(False, "Continue the unfinished run --output_dir/--run_name after its last finished "
                           "epoch (--flagfile=RUN/flags.txt --resume).")

    def __post_init__(self) -> None:
        if isinstance(self.images, (str, os.PathLike)):  # PretrainConfig(images="folder"): one source
            self.images = (self.images,)
        self.images = tuple(os.fspath(path) for path in self.images or ())

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_choices(self)
        if not self.images:
            raise ConfigError("images", None, "name at least one folder or CSV of images to pretrain on.")
        for path in self.images:
            if not os.path.exists(path):
                raise ConfigError("images", path, "no such folder or file.")
        for name in ("epochs", "batch_size", "learning_rate", "embedding_dim", "max_pixels", "crop_scale_min"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "must be positive.")
        for name in ("weight_decay", "warmup_epochs", "rotation_degrees"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0.")
        if self.batch_size < 2:
            raise ConfigError("batch_size", self.batch_size, "at least 2: the losses use statistics of the batch.")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", self.warmup_epochs, f"must be fewer than --epochs={self.epochs}.")
        if self.crop_scale_min > 1:
            raise ConfigError("crop_scale_min", self.crop_scale_min, "a share of the image: at most 1.")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ConfigError("blur_prob", self.blur_prob, "must be in [0, 1].")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError("image_size", self.image_size, f"must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}.")
        if self.cache == "none":
            raise ConfigError("cache", self.cache, "pretraining draws views from decoded images: memory or a "
                              "directory.")
        if self.cache != "memory":
            check_writable("cache", self.cache)
        if self.weights not in ("imagenet", "none") and not os.path.isfile(self.weights):
            raise ConfigError("weights", self.weights, "expected 'imagenet', 'none' or an existing weights file.")
        if self.run_name is not None:
            check_plain_name("run_name", self.run_name)
        if self.resume and not self.run_name:
            raise ConfigError("run_name", None, "--resume needs the name of the run directory in --output_dir.")
        check_writable("output_dir", self.output_dir)

    def learning_rate_at(self, epoch: int) -> float:
        """The rate of 0-based ``epoch``: a linear warmup, then constant or half a cosine down to 0."""
        if epoch < self.warmup_epochs:
            return self.learning_rate * (epoch + 1) / (self.warmup_epochs + 1)
        if self.schedule == "constant":
            return self.learning_rate
        progress = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))

    # The flagfile round trip and the resume comparison are TrainConfig's, which read only the fields
    # (config.RUN_LOCATION_FIELDS may differ on resuming: output_dir, run_name, resume).
    changed_settings = TrainConfig.changed_settings
    to_flagfile = TrainConfig.to_flagfile
    from_args = classmethod(TrainConfig.from_args.__func__)
    from_flagfile = classmethod(TrainConfig.from_flagfile.__func__)
