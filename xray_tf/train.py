"""``python -m xray_tf.train``: train a chest X-ray classifier and write a run directory.

Examples::

    python -m xray_tf.train --flagfile=flags/demo.cfg              # synthetic data, minutes on CPU
    python -m xray_tf.train --flagfile=flags/pdcxfl.cfg --data_dir=PATH/TO/CORONAHACK
    python -m xray_tf.train --data_dir=PATH/TO/CORONAHACK --check_data  # check every file, train nothing
    python -m xray_tf.train --flagfile=saved_models/RUN/flags.txt --resume  # continue a killed run

Flags are defined here only; they become a ``TrainConfig`` whose defaults they share.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

from xray_tf import config as config_lib
from xray_tf import compile_cache, data, losses, models

_DEFAULTS = config_lib.TrainConfig()

# Data
flags.DEFINE_string("data_dir", None, "CoronaHack folder (holding Chest_xray_Corona_Metadata.csv). "
                    "Omitted: a synthetic dataset is generated once and used, and the run says so loudly.")
flags.DEFINE_string("extra_data", None, "Folder with metadata.csv (X_ray_image_name,Label) and images/ "
                    "whose images are added to the training split only (the paper's extra COVID-19 samples).")
flags.DEFINE_enum("task", _DEFAULTS.task, list(data.TASKS), "Which classes to tell apart.")
flags.DEFINE_float("val_fraction", _DEFAULTS.val_fraction, "Stratified share of TRAIN held out for validation.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for the split, sampling, augmentation and initialisation.")
flags.DEFINE_enum("on_bad_image", _DEFAULTS.on_bad_image, list(config_lib.ON_BAD_IMAGE),
                  "An image file that cannot be decoded: error stops before training, listing every such file; "
                  "skip trains without them and lists them in the log and in RUN/skipped_images.csv.")
flags.DEFINE_bool("check_data", False, "Only check the data: read the metadata, decode every image once, report "
                  "every problem and exit (status 0: no problem, 1: problems). Trains nothing, writes nothing.")
# Input pipeline
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Images are resized to image_size x image_size (>= 32).")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Batch size.")
flags.DEFINE_string("cache", _DEFAULTS.cache, "Where decoded images are cached: memory, none, or a directory.")
flags.DEFINE_enum("sampler", _DEFAULTS.sampler, list(config_lib.SAMPLERS),
                  "balanced: every draw picks each class with equal probability (epoch = size of TRAIN).")
flags.DEFINE_enum("class_weight", _DEFAULTS.class_weight, list(config_lib.CLASS_WEIGHTS),
                  "balanced: weight the loss of each class by n / (k * n_class).")
flags.DEFINE_float("rotation_degrees", _DEFAULTS.rotation_degrees, "Maximum random rotation, in degrees.")
flags.DEFINE_float("rotation_prob", _DEFAULTS.rotation_prob, "Probability that a training image is rotated.")
# Model
flags.DEFINE_enum("model", _DEFAULTS.model, list(models.MODEL_NAMES), "Backbone.")
flags.DEFINE_string("weights", _DEFAULTS.weights, "imagenet (Keras download), none, or a Keras weights file "
                    "for the backbone without its top.")
flags.DEFINE_string("chexnet_weights", None, "Converted CheXNet weights for --model=densenet_chexnet.")
flags.DEFINE_float("dropout", _DEFAULTS.dropout, "Dropout rate before the classifier.")
# Loss and optimisation
flags.DEFINE_enum("loss", _DEFAULTS.loss, list(losses.LOSS_NAMES), "ce: categorical cross-entropy; focal: focal loss.")
flags.DEFINE_float("focal_gamma", _DEFAULTS.focal_gamma, "Focal loss focusing parameter gamma.")
flags.DEFINE_string("focal_alpha", _DEFAULTS.focal_alpha, "Focal loss alpha: a number, 'balanced', "
                    "or one comma-separated number per class.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Initial Adam learning rate.")
flags.DEFINE_float("lr_decay", _DEFAULTS.lr_decay, "Factor applied to the learning rate every lr_decay_epochs.")
flags.DEFINE_integer("lr_decay_epochs", _DEFAULTS.lr_decay_epochs, "Epochs between learning-rate decays.")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Number of epochs.")
flags.DEFINE_enum("mixed_precision", _DEFAULTS.mixed_precision, list(config_lib.MIXED_PRECISION),
                  "auto: mixed_bfloat16 when a GPU is present, float32 otherwise.")
flags.DEFINE_enum("jit_compile", _DEFAULTS.jit_compile, list(config_lib.JIT_COMPILE),
                  "XLA compilation of the train step (auto: Keras decides; off on CPU-only TensorFlow).")
flags.DEFINE_string("compilation_cache", _DEFAULTS.compilation_cache, compile_cache.FLAG_HELP)
# Several devices or hosts
flags.DEFINE_enum("distribution", _DEFAULTS.distribution, list(config_lib.DISTRIBUTIONS),
                  "none: one device. mirrored: every GPU of this host (tf.distribute.MirroredStrategy, or "
                  "keras.distribution.DataParallel on JAX). multi_worker: several hosts, each running this command "
                  "(TF_CONFIG, or KERAS_DISTRIBUTION_* on JAX); only the chief writes the run directory. "
                  "--batch_size stays the global batch.")
flags.DEFINE_bool("scale_lr_with_batch", _DEFAULTS.scale_lr_with_batch, "Multiply --learning_rate by the number "
                  "of replicas (the linear scaling rule), for runs that also raise --batch_size that many times.")
# Output
flags.DEFINE_string("output_dir", _DEFAULTS.output_dir, "Where run directories are created.")
flags.DEFINE_string("run_name", None, "Name of the run directory (default: model_loss_task_timestamp); "
                    "an existing name gets a -2, -3 ... suffix, never overwritten.")
flags.DEFINE_bool("resume", _DEFAULTS.resume, "Continue the unfinished run --output_dir/--run_name after its last "
                  "finished epoch, with the settings it was started with (--flagfile=RUN/flags.txt --resume).")

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.TrainConfig:
    """The TrainConfig whose every field is the flag of the same name."""
    return config_lib.TrainConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(config_lib.TrainConfig)})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from xray_tf import training  # imports Keras and TensorFlow: after flag parsing, so --help is fast

    config = config_from_flags()
    try:
        if FLAGS.check_data:  # problems that stop training raise; skipped images are listed
            prepared = training.prepare_data(config, keep_images=False)  # a check keeps nothing
            print(training.check_report(prepared, config.task))
            sys.exit(1 if prepared.skipped else 0)
        run_dir = training.run(config)
    # DataError is a ValueError; FloatingPointError: the loss diverged.
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        logging.error("%s", error)
        sys.exit(f"xray_tf.train: error: {error}")
    if run_dir is None:
        print("Training finished on this worker; the chief worker wrote the run directory.")
    else:
        print(f"Run directory: {run_dir}")


if __name__ == "__main__":
    app.run(main)
