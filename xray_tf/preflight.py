"""Everything checked before a run starts, and the one decoding pass: ``--check_data`` is exactly this.

``prepare_data`` validates the config, indexes the dataset and decodes every image once, and
raises one DataError listing every problem it found -- the metadata's, every file's, and what the
splits or the memory make impossible -- so a user fixes them all at once instead of meeting them
one run at a time. Nothing is written here: the run directory is created only after it passed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import keras

from xray_tf import data, image_cache, models, resources, synthetic
from xray_tf.config import ConfigError, TrainConfig
from xray_tf.decode import list_unreadable

logger = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "NO --data_dir GIVEN: TRAINING ON SYNTHETIC DATA ({path}). "
    "Results say nothing about real X-rays; pass --data_dir=PATH/TO/DATASET for real training."
)
_SKIPPED = "unreadable, skipped (--on_bad_image=skip)"


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """The dataset as training will use it, and what was left out of it."""

    data_dirs: tuple[str, ...]
    synthetic: bool  # no data_dir and no data_csv: the generated stand-in
    index: data.DataIndex  # without the skipped images
    skipped: dict[str, str]  # path -> why it cannot be decoded (on_bad_image=skip)
    decoded: image_cache.DecodedImages  # every indexed image, decoded once; the cache training reads


def prepare_data(config: TrainConfig, keep_images: bool = True) -> PreparedData:
    """Validate ``config``, index the dataset and decode every image once, as ``on_bad_image`` says.

    This is all of ``--check_data`` and the start of every run: every problem with the metadata,
    the image files (missing, not a regular file, over ``max_pixels``, undecodable) and the
    settings they contradict (a batch larger than the training split, no validation image, more
    memory than the machine has) is raised as one DataError before anything is trained or written.
    The decoded images are kept where ``cache`` says (unless ``keep_images`` is False or
    ``cache="none"``), so that training reads them instead of decoding every file a second time.
    """
    config.validate()
    synthetic_data = not config.data_dir and config.data_csv is None
    data_dirs = (synthetic.ensure_default_dataset(),) if synthetic_data else config.data_dir
    if synthetic_data:
        logger.warning(SYNTHETIC_WARNING.format(path=data_dirs[0]))
    index = data.load_index(data_dirs, config.task, config.val_fraction, config.seed, config.extra_data,
                            strict=False, split_by=config.split_by, data_format=config.data_format,
                            data_csv=config.data_csv, class_names=config.class_names)
    for note in index.notes:
        logger.info("%s", note)
    if index.absent_classes:
        logger.warning("No dataset given can hold class(es) %s: the model learns the %d others (%s).",
                       ", ".join(index.absent_classes), len(index.class_names), ", ".join(index.class_names))
    logger.info("Data index, task %s:\n%s", config.task, index.summary())
    # Before hours of decoding: what the weights, the splits or the memory make impossible anyway.
    problems = list(index.problems) + _weights_problems(config) + _split_problems(config, index) \
        + _memory_problems(config, index)
    if problems:  # said now, since checking every file can take minutes
        logger.error("%d problem(s) found before decoding; checking the image files as well, to report "
                     "everything at once:\n%s", len(problems), "\n".join(problems))
    keep = config.cache if keep_images and not problems else "none"
    decoded = image_cache.decode_images(index.frame["path"], config.image_size, keep, max_pixels=config.max_pixels)
    unreadable = decoded.unreadable
    if unreadable and (config.on_bad_image == "error" or problems):
        problems.append(f"{len(unreadable)} image file(s) cannot be used (--on_bad_image=skip trains without "
                        f"them):\n{list_unreadable(unreadable)}")
    elif unreadable:
        logger.warning("Skipping %d image file(s) that cannot be used (--on_bad_image=skip):\n%s",
                       len(unreadable), list_unreadable(unreadable))
        index = index.without(unreadable, _SKIPPED)
        problems += _split_problems(config, index)  # the splits, smaller now
    if len(problems) > 1:
        raise data.DataError(f"{len(problems)} problems found; nothing was trained or written:\n"
                             + "\n".join(problems))
    if problems:
        raise data.DataError(problems[0])
    return PreparedData(data_dirs, synthetic_data, index, unreadable, decoded)


def _weights_problems(config: TrainConfig) -> list[str]:
    """The ImageNet download that would fail after the decoding, offline (``models.check_weights_available``)."""
    try:
        models.check_weights_available(config.model, config.weights)
    except ConfigError as error:
        return [error.as_flag()]
    return []


def _split_problems(config: TrainConfig, index: data.DataIndex) -> list[str]:
    """What the splits make impossible: choosing an epoch without validation images, or a full batch."""
    problems = []
    if index.split("val").empty:
        problems.append(f"{index.summary()}\nno validation images, so no epoch can be chosen; every class needs at "
                        "least 2 training images (see --val_fraction).")
    train_images = len(index.split("train"))
    if config.batch_size > train_images:
        problems.append(f"--batch_size={config.batch_size}: more than the {train_images} training images; a batch "
                        "can hold at most the training split.")
    return problems


def _memory_problems(config: TrainConfig, index: data.DataIndex) -> list[str]:
    """``resources.memory_problems`` of the run; a batch above the training split is refused on its own."""
    batch_size = min(config.batch_size, max(len(index.split("train")), 1))
    cached = len(index.frame) if config.cache == "memory" else 0
    check = functools.partial(resources.memory_problems, config.model, config.image_size, batch_size, cached,
                              resources.available_memory())
    problems = check()
    if problems and has_gpu():  # asked only now: probing the devices prints noise on machines without one
        problems = check(step_on_host=False)
    return problems


def check_report(prepared: PreparedData, task: str) -> str:
    """What ``--check_data`` prints: the datasets read, the images training would use, and any it would skip."""
    lines = [*prepared.index.notes, f"task {task}:", prepared.index.summary()]
    if prepared.skipped:
        lines += [f"{len(prepared.skipped)} image file(s) cannot be used; --on_bad_image=skip leaves them out:",
                  list_unreadable(prepared.skipped)]
    else:
        lines.append("No problems found.")
    return "\n".join(lines)


def dtype_policy(mixed_precision: str) -> str:
    """The Keras dtype policy a ``--mixed_precision`` setting means: auto is mixed_bfloat16 on a GPU."""
    if mixed_precision == "off":
        return "float32"
    if mixed_precision == "auto":
        return "mixed_bfloat16" if has_gpu() else "float32"
    return mixed_precision


def has_gpu() -> bool:
    """Whether Keras sees a GPU (probing prints CUDA noise where there is none: ask only when needed)."""
    return any(device.startswith("gpu") for device in keras.distribution.list_devices())
