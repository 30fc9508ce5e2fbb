"""Classification metrics: a Keras per-class recall for training logs, and a NumPy report.

The report is computed from the confusion matrix (and, for ROC AUC, the predicted probabilities),
so every number in ``metrics.json`` can be checked by hand. A quantity whose denominator is zero
(recall, F1 and ROC AUC of a class absent from the split, precision of a class never predicted,
specificity when every image is of that class) is ``None`` -- undefined, not 0 -- and averages are
taken over the classes where it is defined.

ROC AUC is computed here with NumPy rather than taken from scikit-learn, which the project does not
depend on: it is the Mann-Whitney statistic, the probability that a random image of the class gets a
higher score than a random image of another class, with ties counted as one half.

Every scalar of the report -- accuracy, balanced accuracy, macro F1, macro ROC AUC and per class
recall and specificity -- gets a 95 % bootstrap interval in ``report["ci95"]``, keyed
``"accuracy"`` ... and ``"recall_<class>"``, ``"specificity_<class>"`` with the class spelled as
``per_class`` spells it (``"recall_COVID-19"``). Resampling and the null rule are
``xray_tf.statistics``'s: stratified by class, by patient where ids are given, seeded; null where
the point estimate is undefined or the metric is undefined in more than 2.5 % of the resamples.
Every metric is computed for many weightings of the images at once (a resample is a weight per
image), and the report itself is the weighting where every image counts once, so the point
estimates and their intervals come from the same formulas.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from xray_tf import statistics


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


@keras.saving.register_keras_serializable(package="xray_tf")
class BalancedAccuracy(keras.metrics.Metric):
    """The mean over classes of each class's recall: accuracy as if every class were equally common.

    Counted over every batch of an evaluation, so the validation value is that of the whole split;
    classes absent from it are left out of the mean.
    """

    def __init__(self, num_classes: int, name: str = "balanced_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.hits = self.add_variable(shape=(num_classes,), initializer="zeros", name="hits")
        self.positives = self.add_variable(shape=(num_classes,), initializer="zeros", name="positives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        true = ops.one_hot(ops.argmax(y_true, axis=-1), self.num_classes)  # MixUp's blended targets: the larger
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes)
        self.hits.assign_add(ops.sum(true * predicted, axis=0))
        self.positives.assign_add(ops.sum(true, axis=0))

    def result(self):
        present = ops.cast(self.positives > 0, "float32")
        recalls = ops.divide_no_nan(self.hits, self.positives)
        return ops.divide_no_nan(ops.sum(recalls * present), ops.sum(present))

    def reset_state(self):
        self.hits.assign(ops.zeros((self.num_classes,)))
        self.positives.assign(ops.zeros((self.num_classes,)))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def epoch_metrics(class_names: Sequence[str]) -> list[keras.metrics.Metric]:
    """What ``fit`` logs every epoch for training and validation (``history.csv``), any of which
    ``--select_by`` may choose from: accuracy, each class's recall, balanced accuracy, macro F1 and
    macro ROC AUC (Keras' AUC per class over 500 thresholds, averaged)."""
    return [keras.metrics.CategoricalAccuracy(name="accuracy"),
            *(ClassRecall(i, name=f"recall_{metric_suffix(c)}") for i, c in enumerate(class_names)),
            BalancedAccuracy(len(class_names)),
            keras.metrics.F1Score(average="macro", name="macro_f1"),
            keras.metrics.AUC(num_thresholds=500, multi_label=True, num_labels=len(class_names), name="macro_auc")]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``[k, k]`` counts; rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise quotient, NaN where the denominator is zero: undefined, not 0."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, dtype=np.float64),
                                                 np.asarray(denominator, dtype=np.float64))
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator > 0)


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the values that are not NaN; NaN where none is."""
    defined = ~np.isnan(values)
    return _ratio(np.where(defined, values, 0.0).sum(axis=-1), defined.sum(axis=-1))


def _matrix_metrics(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """The report's confusion-matrix metrics of each matrix ``[r, k, k]``: per class ``[r, k]``, overall ``[r]``."""
    true_counts, predicted_counts = matrices.sum(axis=2), matrices.sum(axis=1)
    hits = np.diagonal(matrices, axis1=1, axis2=2)
    total = true_counts.sum(axis=1)
    negatives = total[:, None] - true_counts
    recall = _ratio(hits, true_counts)
    # 2TP / (2TP + FP + FN): 0 for a present class never predicted, undefined for an absent one.
    f1 = np.where(true_counts > 0, _ratio(2 * hits, true_counts + predicted_counts), np.nan)
    return {
        "support": true_counts,
        "precision": _ratio(hits, predicted_counts),
        "recall": recall,
        "specificity": _ratio(negatives - (predicted_counts - hits), negatives),
        "f1": f1,
        "accuracy": _ratio(hits.sum(axis=1), total),
        "balanced_accuracy": _mean_defined(recall),
        "macro_f1": _mean_defined(f1),
    }


def _weighted_aucs(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` under each row of per-image ``weights`` ``[r, n]``: ``[r]``, NaN where undefined.

    The Mann-Whitney count with weights: each positive scores the weight of the negatives below it
    plus half the weight of those tied with it, read off the negatives' cumulative weight (sorted
    once for every resample) where its score would be inserted.
    """
    negatives = np.flatnonzero(~is_positive)
    order = np.argsort(scores[negatives], kind="stable")
    negative_scores, negatives = scores[negatives][order], negatives[order]
    cumulative = np.zeros((len(weights), len(negatives) + 1))  # weight of the lowest j negatives, j = 0..m
    np.cumsum(weights[:, negatives], axis=1, out=cumulative[:, 1:])
    positive_scores = scores[is_positive]
    below = cumulative[:, np.searchsorted(negative_scores, positive_scores, side="left")]
    not_above = cumulative[:, np.searchsorted(negative_scores, positive_scores, side="right")]
    positive_weights = weights[:, is_positive]
    wins = np.sum(positive_weights * (below + not_above), axis=1) / 2.0  # below + half the ties
    return _ratio(wins, positive_weights.sum(axis=1) * cumulative[:, -1])


def _binary_inputs(is_positive: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_positive.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"Expected two equal 1-D arrays, got shapes {is_positive.shape} and {scores.shape}.")
    _check_finite(scores)
    return is_positive, scores


def _check_finite(scores: np.ndarray) -> None:
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or infinity; the model's probabilities are not usable.")


def roc_auc(is_positive: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of ``scores`` for the positives; ``None`` without positives or negatives.

    Rank-based (Mann-Whitney U / (n_pos * n_neg)), a tie between a positive and a negative counting
    one half, exactly the trapezoidal area under ``roc_curve``.
    """
    is_positive, scores = _binary_inputs(is_positive, scores)
    return statistics.defined(_weighted_aucs(is_positive, scores, np.ones((1, len(scores))))[0])


def _descending_counts(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(true positives, false positives)`` at each threshold between distinct scores, highest first."""
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], is_positive[order]
    last_of_group = np.append(ordered[1:] != ordered[:-1], True)  # tied scores make one step
    return np.cumsum(hits)[last_of_group], np.cumsum(~hits)[last_of_group]


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
    true_positives, false_positives = _descending_counts(is_positive, scores)
    return (np.concatenate([[0.0], false_positives / n_neg]), np.concatenate([[0.0], true_positives / n_pos]))


def precision_recall_curve(is_class: Sequence[bool],
                           scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(recall, precision, average precision)``, a point per distinct score after (0, 1); ``None`` without positives.

    Average precision is the step-wise sum of precision times each step's gain in recall (no
    interpolation between points), so a ranking with every positive first scores 1 and a class
    that is a share p of the images scores about p under random scores.
    """
    is_class, scores = _binary_inputs(is_class, scores)
    n_pos = int(is_class.sum())
    if n_pos == 0:
        return None
    true_positives, false_positives = _descending_counts(is_class, scores)
    recall = true_positives / n_pos
    precision = true_positives / (true_positives + false_positives)
    average_precision = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    return np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision]), average_precision


def metric_values(weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                  probabilities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The metrics that get intervals in ``ci95``, under each row of per-image ``weights``.

    ``weights`` ``[r, n]`` says how many times each image counts (a bootstrap resample; a row of
    ones is the split itself); the result maps each name to ``[r]`` values, NaN where undefined.
    ``macro_roc_auc`` is there when ``probabilities`` ``[n, k]`` are given.
    """
    num_classes = len(class_names)
    cells = np.zeros((len(y_true), num_classes * num_classes))
    cells[np.arange(len(y_true)), np.asarray(y_true) * num_classes + np.asarray(y_pred)] = 1.0
    matrix_metrics = _matrix_metrics((weights @ cells).reshape(len(weights), num_classes, num_classes))
    values = {name: matrix_metrics[name] for name in ("accuracy", "balanced_accuracy", "macro_f1")}
    if probabilities is not None:
        aucs = [_weighted_aucs(np.asarray(y_true) == i, probabilities[:, i], weights) for i in range(num_classes)]
        values["macro_roc_auc"] = _mean_defined(np.stack(aucs, axis=1))
    for i, name in enumerate(class_names):
        values[interval_name("recall", name)] = matrix_metrics["recall"][:, i]
        values[interval_name("specificity", name)] = matrix_metrics["specificity"][:, i]
    return values


def interval_name(metric: str, class_name: str) -> str:
    """``("recall", "COVID-19")`` -> ``"recall_COVID-19"``: a per-class key of ``ci95``, spelled as ``per_class`` is."""
    return f"{metric}_{class_name}"


def classification_report(
    matrix: np.ndarray,
    class_names: Sequence[str],
    y_true: Sequence[int] | None = None,
    probabilities: np.ndarray | None = None,
    *,
    groups: Sequence[object] | None = None,
    resamples: int = statistics.RESAMPLES,
    seed: int = 0,
) -> dict:
    """Accuracy, balanced accuracy, macro F1 and per-class precision, recall (sensitivity),
    specificity and F1 from a confusion matrix, with bootstrap intervals under ``ci95``.

    Given the true labels and the predicted probabilities ``[n, k]`` of the same images (whose
    argmax the matrix counts), it adds the one-vs-rest ROC AUC of each class and their mean over
    the classes where it is defined, and resamples those images; ``groups`` (a patient id per
    image) makes the resampling draw a patient's images together. Without labels the matrix's
    counts are resampled, each image on its own. ``resamples`` and ``seed`` are the bootstrap's.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"A confusion matrix of shape {matrix.shape} does not fit {num_classes} classes.")
    if groups is not None and y_true is None:
        raise ValueError("Patient groups need the images' labels and probabilities, in the groups' order.")
    y_true, y_pred, probabilities = _per_image(matrix, y_true, probabilities)
    matrix_metrics = {name: values[0] for name, values in _matrix_metrics(matrix[None]).items()}
    aucs = None
    if probabilities is not None:
        single = np.ones((1, len(y_true)))
        aucs = np.array([_weighted_aucs(y_true == i, probabilities[:, i], single)[0] for i in range(num_classes)])
    per_class = {}
    for i, name in enumerate(class_names):
        per_class[name] = {"support": int(matrix_metrics["support"][i])}
        per_class[name].update({key: statistics.defined(matrix_metrics[key][i])
                                for key in ("precision", "recall", "specificity", "f1")})
        if aucs is not None:
            per_class[name]["roc_auc"] = statistics.defined(aucs[i])
    report = {"num_images": int(matrix.sum())}
    report.update({key: statistics.defined(matrix_metrics[key])
                   for key in ("accuracy", "balanced_accuracy", "macro_f1")})
    if aucs is not None:
        report["macro_roc_auc"] = statistics.defined(_mean_defined(aucs))
    report["per_class"] = per_class
    report["confusion_matrix"] = matrix.tolist()

    def values(weights: np.ndarray) -> dict[str, np.ndarray]:
        return metric_values(weights, y_true, y_pred, class_names, probabilities)

    points = {name: statistics.defined(value[0]) for name, value in values(np.ones((1, len(y_true)))).items()}
    report["ci95"] = statistics.intervals(statistics.bootstrap(values, y_true, groups, resamples, seed), points)
    return report


def _per_image(matrix: np.ndarray, y_true: Sequence[int] | None, probabilities: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(true class, predicted class, probabilities or None)`` of each image the matrix counts.

    From the labels and probabilities, after checking that they describe the matrix's images; from
    the matrix alone, one (true, predicted) pair per count, for the intervals of its metrics.
    """
    num_classes = len(matrix)
    if y_true is None and probabilities is None:
        cells = np.repeat(np.arange(matrix.size), matrix.ravel())
        return cells // num_classes, cells % num_classes, None
    if y_true is None or probabilities is None:
        raise ValueError("ROC AUC needs both the true labels and the predicted probabilities.")
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(y_true), num_classes):
        raise ValueError(
            f"Probabilities of shape {probabilities.shape} do not fit {len(y_true)} labels and {num_classes} classes."
        )
    if not np.array_equal(np.bincount(y_true, minlength=num_classes), matrix.sum(axis=1)):
        raise ValueError("The true labels do not match the confusion matrix's class counts.")
    _check_finite(probabilities)
    y_pred = np.argmax(probabilities, axis=1)
    if not np.array_equal(confusion_matrix(y_true, y_pred, num_classes), matrix):
        raise ValueError("The confusion matrix does not count the probabilities' argmax; the report resamples "
                         "the images it describes and needs the two to agree.")
    return y_true, y_pred, probabilities
