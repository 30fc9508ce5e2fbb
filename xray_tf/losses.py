"""Loss functions and class weights for imbalanced chest X-ray classes.

Focal loss is Keras' own ``CategoricalFocalCrossentropy`` (tensorflow-addons is end-of-life and
has no Keras 3 build): per example ``-alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t`` the
weight of the true class, so a per-class ``alpha`` list re-weights classes as well as focusing on
hard examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from xray_tf.config import LOSSES, ConfigError


def balanced_weights(class_counts: Sequence[int]) -> list[float]:
    """Inverse-frequency weights ``n / (k * n_c)``: 1.0 for every class when classes are equal.

    This is scikit-learn's "balanced" rule; a class with no examples would get an infinite
    weight, so it is refused instead.
    """
    if any(count <= 0 for count in class_counts):
        raise ValueError(f"Cannot balance classes with counts {list(class_counts)}: every class needs examples.")
    total, k = sum(class_counts), len(class_counts)
    return [total / (k * count) for count in class_counts]


def parse_focal_alpha(text: str, class_counts: Sequence[int]) -> float | list[float]:
    """Turn ``--focal_alpha`` (a number, ``balanced``, or one comma-separated number a class) into alpha."""
    text = text.strip()
    if text == "balanced":
        return balanced_weights(class_counts)
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError("focal_alpha", text, f"expected a number, 'balanced', or {len(class_counts)} "
                          "comma-separated numbers.") from None
    if any(value <= 0 for value in values):
        raise ConfigError("focal_alpha", text, "every alpha must be positive.")
    if len(values) == 1:
        return values[0]
    if len(values) != len(class_counts):
        raise ConfigError("focal_alpha", text, f"{len(values)} values for {len(class_counts)} classes.")
    return values


def build_loss(
    name: str,
    class_counts: Sequence[int],
    focal_gamma: float = 2.0,
    focal_alpha: str = "0.25",
    label_smoothing: float = 0.0,
) -> keras.losses.Loss:
    """The training loss for one-hot (or MixUp-blended) targets and softmax probabilities.

    ``label_smoothing`` s replaces the targets by ``(1 - s) * targets + s / k`` before either loss.
    """
    if name == "ce":
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, name="ce")
    if name == "focal":
        return keras.losses.CategoricalFocalCrossentropy(
            alpha=parse_focal_alpha(focal_alpha, class_counts), gamma=focal_gamma, label_smoothing=label_smoothing,
            name="focal"
        )
    raise ConfigError("loss", name, f"not one of {', '.join(LOSSES)}.")
