"""Classification metrics: a Keras per-class recall for training logs, and a NumPy report.

The report is computed from the confusion matrix (and, for ROC AUC, the predicted probabilities),
so every number in ``metrics.json`` can be checked by hand. A quantity whose denominator is zero
(recall, F1 and ROC AUC of a class absent from the split, precision of a class never predicted,
specificity when every image is of that class) is ``None`` -- undefined, not 0 -- and averages are
taken over the classes where it is defined.

ROC AUC is computed here with NumPy rather than taken from scikit-learn, which the project does not
depend on: it is the Mann-Whitney statistic, the probability that a random image of the class gets a
higher score than a random image of another class, with ties counted as one half.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def _midranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores``, tied values sharing the mean of the ranks they span."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], len(scores))  # exclusive
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def _binary_inputs(is_positive: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_positive.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"Expected two equal 1-D arrays, got shapes {is_positive.shape} and {scores.shape}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or infinity; the model's probabilities are not usable.")
    return is_positive, scores


def roc_auc(is_positive: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of ``scores`` for the positives; ``None`` without positives or negatives.

    Rank-based (Mann-Whitney U / (n_pos * n_neg)) with mid-ranks, so a tie between a positive and a
    negative counts one half, exactly the trapezoidal area under ``roc_curve``.
    """
    is_positive, scores = _binary_inputs(is_positive, scores)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = _midranks(scores)[is_positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(is_positive: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(false positive rates, true positive rates)`` from (0, 0) to (1, 1), one point per distinct score.

    Tied scores become one step (a diagonal segment), matching ``roc_auc``. ``None`` when the curve
    is undefined (no positives or no negatives).
    """
    is_positive, scores = _binary_inputs(is_positive, scores)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], is_positive[order]
    last_of_group = np.append(ordered[1:] != ordered[:-1], True)  # thresholds between distinct scores
    true_positives = np.cumsum(hits)[last_of_group]
    false_positives = np.cumsum(~hits)[last_of_group]
    return (np.concatenate([[0.0], false_positives / n_neg]), np.concatenate([[0.0], true_positives / n_pos]))


def classification_report(
    matrix: np.ndarray,
    class_names: Sequence[str],
    y_true: Sequence[int] | None = None,
    probabilities: np.ndarray | None = None,
) -> dict:
    """Accuracy, balanced accuracy, macro F1 and per-class precision, recall (sensitivity),
    specificity and F1 from a confusion matrix.

    Given the true labels and the predicted probabilities ``[n, k]`` of the same images, it adds the
    one-vs-rest ROC AUC of each class and their mean over the classes where it is defined.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    total = int(matrix.sum())
    true_counts, predicted_counts, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    aucs = _one_vs_rest_aucs(true_counts, len(class_names), y_true, probabilities)
    per_class = {}
    for i, name in enumerate(class_names):
        negatives = total - true_counts[i]
        false_positives = predicted_counts[i] - hits[i]
        per_class[name] = {
            "support": int(true_counts[i]),
            "precision": _ratio(hits[i], predicted_counts[i]),
            "recall": _ratio(hits[i], true_counts[i]),
            "specificity": _ratio(negatives - false_positives, negatives),
            # 2TP / (2TP + FP + FN): 0 for a present class never predicted, undefined for an absent one.
            "f1": _ratio(2 * hits[i], true_counts[i] + predicted_counts[i]) if true_counts[i] else None,
        }
        if aucs is not None:
            per_class[name]["roc_auc"] = aucs[i]
    report = {
        "num_images": total,
        "accuracy": _ratio(hits.sum(), total),
        "balanced_accuracy": _mean_defined([c["recall"] for c in per_class.values()]),
        "macro_f1": _mean_defined([c["f1"] for c in per_class.values()]),
    }
    if aucs is not None:
        report["macro_roc_auc"] = _mean_defined(aucs)
    report["per_class"] = per_class
    report["confusion_matrix"] = matrix.tolist()
    return report


def _one_vs_rest_aucs(
    true_counts: np.ndarray, num_classes: int, y_true: Sequence[int] | None, probabilities: np.ndarray | None
) -> list[float | None] | None:
    """Per-class ROC AUC, after checking that labels and probabilities describe the matrix's images."""
    if y_true is None and probabilities is None:
        return None
    if y_true is None or probabilities is None:
        raise ValueError("ROC AUC needs both the true labels and the predicted probabilities.")
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(y_true), num_classes):
        raise ValueError(
            f"Probabilities of shape {probabilities.shape} do not fit {len(y_true)} labels and {num_classes} classes."
        )
    if not np.array_equal(np.bincount(y_true, minlength=num_classes), true_counts):
        raise ValueError("The true labels do not match the confusion matrix's class counts.")
    return [roc_auc(y_true == i, probabilities[:, i]) for i in range(num_classes)]
