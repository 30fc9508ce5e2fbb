"""Classification metrics: a Keras per-class recall for training logs, and a NumPy report.

The report is computed from the confusion matrix alone, so every number in ``metrics.json`` can
be checked by hand. A quantity whose denominator is zero (recall and F1 of a class absent from
the split, precision of a class never predicted) is ``None`` -- undefined, not 0 -- and averages
are taken over the classes where it is defined.
"""

from __future__ import annotations

import re
from typing import Sequence

import keras
import numpy as np
from keras import ops


def metric_suffix(class_name: str) -> str:
    """``"COVID-19"`` -> ``"covid_19"``: a class name usable in metric and column names."""
    return re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


@keras.saving.register_keras_serializable(package="xray_tf")
class ClassRecall(keras.metrics.Metric):
    """Recall (sensitivity) of one class, from the argmax of one-hot targets and probabilities."""

    def __init__(self, class_id: int, name: str | None = None, **kwargs):
        super().__init__(name=name or f"recall_{class_id}", **kwargs)
        self.class_id = class_id
        self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")
        self.positives = self.add_variable(shape=(), initializer="zeros", name="positives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        is_class = ops.cast(ops.argmax(y_true, axis=-1) == self.class_id, "float32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1) == self.class_id, "float32")
        self.hits.assign_add(ops.sum(is_class * predicted))
        self.positives.assign_add(ops.sum(is_class))

    def result(self):
        return ops.divide_no_nan(self.hits, self.positives)

    def reset_state(self):
        self.hits.assign(0.0)
        self.positives.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``[k, k]`` counts; rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_report(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro F1 and per-class precision/recall/F1 from a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.int64)
    true_counts, predicted_counts, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    per_class = {}
    for i, name in enumerate(class_names):
        precision = _ratio(hits[i], predicted_counts[i])
        recall = _ratio(hits[i], true_counts[i])
        # 2TP / (2TP + FP + FN): 0 for a present class never predicted, undefined for an absent one.
        f1 = _ratio(2 * hits[i], true_counts[i] + predicted_counts[i]) if true_counts[i] else None
        per_class[name] = {"support": int(true_counts[i]), "precision": precision, "recall": recall, "f1": f1}
    return {
        "num_images": int(matrix.sum()),
        "accuracy": _ratio(hits.sum(), matrix.sum()),
        "balanced_accuracy": _mean_defined([c["recall"] for c in per_class.values()]),
        "macro_f1": _mean_defined([c["f1"] for c in per_class.values()]),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }
