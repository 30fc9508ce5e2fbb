"""Class probabilities from uint8 images: the one way ``xray-evaluate`` and ``xray-predict`` make them.

A ``Member`` is one model (a Keras model, or any function from a uint8 batch to probabilities,
such as a SavedModel's serving signature) with its optional softmax temperature. Each member
predicts every view of every batch; its temperature scales each view's probabilities (it was
fitted on plain single images, which is one view); the member's probabilities are the mean over
the views, and an ensemble's the mean over its members. Every call gets exactly ``batch_size``
images, the last batch padded with blank ones, so a compiled predict step sees one shape.

Test-time augmentation (``tta``), deterministic:

* ``none``: the images as they are;
* ``flip``: the images and their horizontal mirror images;
* ``flip_rotate``: those two and the images rotated by +-``TTA_ROTATION_DEGREES``, bilinear with
  black corners, exactly as training's augmentation rotates (``augment.rotation_transforms``).

``predictions_table`` names the predictions CSV's columns for both commands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from xray_tf import augment, calibration
from xray_tf.config import TTA_MODES, ConfigError
from xray_tf.metrics import metric_suffix

# Within training's default +-15 degrees (--rotation_degrees), so the model has seen such views.
TTA_ROTATION_DEGREES = 10.0


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an ensemble (or the only one)."""

    predict: Callable[[np.ndarray], np.ndarray]  # uint8 [batch, S, S, 1] -> probabilities [batch, k]
    temperature: float | None = None  # softmax temperature applied to its probabilities; None: as they are
    name: str = "model"


def keras_member(model: keras.Model, temperature: float | None = None, name: str | None = None) -> Member:
    """A Keras classifier as a ``Member``, predicting one batch at a time on any backend."""
    return Member(lambda images: keras.ops.convert_to_numpy(model.predict_on_batch(images)), temperature,
                  name or model.name)


def _rotated(images: np.ndarray, degrees: float) -> np.ndarray:
    size_y, size_x = images.shape[1:3]
    angles = tf.fill([len(images)], np.float32(np.deg2rad(degrees)))
    turned = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(images), transforms=augment.rotation_transforms(angles, size_y, size_x),
        output_shape=[size_y, size_x], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return turned.numpy()


def _check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise ConfigError("tta", tta, f"not one of {', '.join(TTA_MODES)}.")


def views(images: np.ndarray, tta: str) -> list[np.ndarray]:
    """The views of a uint8 batch ``[B, H, W, C]`` that ``tta`` averages over, the images themselves first."""
    _check_tta(tta)
    result = [images]
    if tta in ("flip", "flip_rotate"):
        result.append(images[:, :, ::-1])
    if tta == "flip_rotate":
        result += [_rotated(images, TTA_ROTATION_DEGREES), _rotated(images, -TTA_ROTATION_DEGREES)]
    return result


def batches_of(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """``images`` in consecutive batches of ``batch_size`` (the last one shorter)."""
    return (images[start:start + batch_size] for start in range(0, len(images), batch_size))


def _padded_predict(member: Member, images: np.ndarray, batch_size: int) -> np.ndarray:
    count = len(images)
    if count < batch_size:
        images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
    probabilities = np.asarray(member.predict(images), dtype=np.float64)[:count]
    return calibration.apply_temperature(probabilities, member.temperature)


def member_probabilities(members: Sequence[Member], batches: Iterable[np.ndarray], batch_size: int,
                         tta: str = "none") -> np.ndarray:
    """``float64 [members, n, k]``: each member's probabilities for the images of ``batches``, in order.

    A batch may hold up to ``batch_size`` images; each member predicts each ``views`` of it,
    temperature-scaled, and averages over the views.
    """
    if not members:
        raise ValueError("No model to predict with.")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be positive.")
    _check_tta(tta)  # before any prediction
    per_batch = []
    for images in batches:
        if len(images) > batch_size:
            raise ValueError(f"A batch of {len(images)} images is larger than batch_size={batch_size}.")
        batch_views = views(np.asarray(images), tta)
        outputs = [np.mean([_padded_predict(member, view, batch_size) for view in batch_views], axis=0)
                   for member in members]
        if len({output.shape for output in outputs}) > 1:
            raise ValueError("The models give different numbers of classes: "
                             + ", ".join(f"{m.name} {o.shape[-1]}" for m, o in zip(members, outputs)) + ".")
        per_batch.append(np.stack(outputs))
    if not per_batch:
        raise ValueError("No images to predict.")
    return np.concatenate(per_batch, axis=1)


def ensemble_probabilities(members: Sequence[Member], batches: Iterable[np.ndarray], batch_size: int,
                           tta: str = "none") -> np.ndarray:
    """``float64 [n, k]``: the mean over ``members`` of ``member_probabilities``."""
    return member_probabilities(members, batches, batch_size, tta).mean(axis=0)


def check_compatible(field: str, properties: Mapping[str, Mapping[str, object]]) -> None:
    """Raise ConfigError(field, member, what differs) unless every member has the first one's properties.

    ``properties`` maps each member's name (its run directory or model path) to what an ensemble's
    members must share, e.g. ``{"task": ..., "classes": [...], "image_size": 224}``.
    """
    (first, expected), *others = properties.items()
    for name, given in others:
        for key, value in expected.items():
            if given.get(key) != value:
                raise ConfigError(field, name, f"its {key} is {given.get(key)!r} but {first}'s is {value!r}; "
                                  "the models of an ensemble must share task, classes and image size.")


def probability_column(class_name: str) -> str:
    """``p_covid_19``: the predictions CSV column (evaluate's and predict's) of a class's probability."""
    return f"p_{metric_suffix(class_name)}"


def flag_column(class_name: str) -> str:
    """``flag_covid_19``: the predictions CSV column of a class's operating-point flag (1 or 0)."""
    return f"flag_{metric_suffix(class_name)}"


def predictions_table(files: Sequence[str], probabilities: np.ndarray, class_names: Sequence[str],
                      true_classes: Sequence[str] | None = None, patients: Sequence[object] | None = None,
                      thresholds: dict[str, float] | None = None) -> pd.DataFrame:
    """The predictions table, columns named as ``xray-evaluate`` and ``xray-predict`` both write them.

    ``file``, ``true_class`` (when known), ``predicted_class``, ``p_<class>`` per class
    (``probability_column``), ``patient`` (when known), and ``flag_<class>`` (``flag_column``: 1 when
    the class's probability is at least its operating point's threshold, else 0) per class of ``thresholds``.
    """
    table = pd.DataFrame({"file": list(files)})
    if true_classes is not None:
        table["true_class"] = list(true_classes)
    table["predicted_class"] = [class_names[i] for i in np.argmax(probabilities, axis=-1)]
    for i, name in enumerate(class_names):
        table[probability_column(name)] = probabilities[:, i]
    if patients is not None:
        table["patient"] = list(patients)
    for name, threshold in (thresholds or {}).items():
        table[flag_column(name)] = (probabilities[:, list(class_names).index(name)] >= threshold).astype(int)
    return table
