"""The NumPy classification report against values computed by hand, ROC AUC and curves included.

Every expected number below is worked out in the comments from the hand-made confusion matrix, so a
reader can check the test as well as the code.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from xray_tf import metrics
from xray_tf.config import ConfigError

CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")
# Rows: true class, columns: predicted. Virus is absent from the split but predicted once (wrongly).
MATRIX = np.array([
    [3, 1, 0, 0],  # Normal: 4 images
    [1, 4, 1, 0],  # Bacteria: 6 images
    [0, 0, 0, 0],  # Virus: absent
    [0, 1, 0, 1],  # COVID-19: 2 images
])                 # 12 images; predicted counts 4, 6, 1, 1; hits 3, 4, 0, 1


@pytest.fixture(autouse=True)
def no_warnings():
    """Turn any warning, and any NumPy division by zero or invalid value, into a failure."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


def test_report_matches_hand_computed_values():
    report = metrics.classification_report(MATRIX, CLASSES)
    assert report["num_images"] == 12
    assert report["accuracy"] == pytest.approx(8 / 12)
    # precision = hits / predicted, recall = hits / true, specificity = TN / (TN + FP), F1 = 2TP / (true + predicted)
    expected = {
        "Normal": {"support": 4, "precision": 3 / 4, "recall": 3 / 4, "specificity": 7 / 8, "f1": 6 / 8},
        "Bacteria": {"support": 6, "precision": 4 / 6, "recall": 4 / 6, "specificity": 4 / 6, "f1": 8 / 12},
        "Virus": {"support": 0, "precision": 0.0, "recall": None, "specificity": 11 / 12, "f1": None},
        "COVID-19": {"support": 2, "precision": 1.0, "recall": 1 / 2, "specificity": 10 / 10, "f1": 2 / 3},
    }
    for name, values in expected.items():
        for key, value in values.items():
            assert report["per_class"][name][key] == (None if value is None else pytest.approx(value)), (name, key)
    # Averages over the classes where the value is defined: Virus is left out, not counted as 0.
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6 + 1 / 2) / 3)  # 23/36
    assert report["macro_f1"] == pytest.approx((6 / 8 + 8 / 12 + 2 / 3) / 3)  # 25/36
    assert report["confusion_matrix"] == MATRIX.tolist()
    assert "macro_roc_auc" not in report and "roc_auc" not in report["per_class"]["Normal"]


def test_undefined_values_are_null_in_json():
    report = metrics.classification_report(MATRIX, CLASSES)
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["per_class"]["Virus"]["recall"] is None


def test_never_predicted_class_has_undefined_precision_and_zero_f1():
    report = metrics.classification_report(np.array([[2, 0], [1, 0]]), ("a", "b"))
    assert report["per_class"]["b"]["precision"] is None
    assert report["per_class"]["b"]["recall"] == 0.0 and report["per_class"]["b"]["f1"] == 0.0
    assert report["per_class"]["a"]["specificity"] == 0.0  # the one negative was called "a"
    assert report["per_class"]["b"]["specificity"] == 1.0


def test_single_class_split_has_undefined_specificity():
    report = metrics.classification_report(np.array([[3, 0], [0, 0]]), ("a", "b"))
    assert report["per_class"]["a"]["specificity"] is None  # no negatives at all
    assert report["per_class"]["b"]["specificity"] == 1.0


def test_empty_split_is_undefined_everywhere():
    report = metrics.classification_report(np.zeros((2, 2), dtype=int), ("a", "b"))
    assert report["accuracy"] is None and report["balanced_accuracy"] is None and report["macro_f1"] is None


def test_roc_auc_by_hand_with_ties():
    # Positives 0.9, 0.5; negatives 0.5, 0.1, 0.3. Pairs won: 0.9 beats all 3; 0.5 ties one (1/2)
    # and beats two. AUC = (3 + 2.5) / (2 * 3) = 11/12.
    positive = [True, True, False, False, False]
    scores = [0.9, 0.5, 0.5, 0.1, 0.3]
    assert metrics.roc_auc(positive, scores) == pytest.approx(11 / 12)
    fpr, tpr = metrics.roc_curve(positive, scores)
    # One point per distinct score, descending: 0.9 -> (0, 1/2), 0.5 -> (1/3, 1), 0.3 -> (2/3, 1), 0.1 -> (1, 1).
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 2, 1, 1, 1])
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(11 / 12)


@pytest.mark.parametrize("scores, expected", [
    ([0.9, 0.8, 0.2, 0.1], 1.0),  # every positive above every negative
    ([0.1, 0.2, 0.8, 0.9], 0.0),
    ([0.5, 0.5, 0.5, 0.5], 0.5),  # all tied: every pair counts one half
])
def test_roc_auc_extremes(scores, expected):
    assert metrics.roc_auc([True, True, False, False], scores) == expected


def test_roc_auc_undefined_without_positives_or_negatives():
    assert metrics.roc_auc([False, False], [0.2, 0.4]) is None
    assert metrics.roc_auc([True, True], [0.2, 0.4]) is None
    assert metrics.roc_curve([False, False], [0.2, 0.4]) is None


def test_roc_auc_matches_pairwise_count_on_random_scores():
    rng = np.random.default_rng(0)
    positive = rng.random(60) < 0.3
    scores = rng.integers(0, 6, 60) / 5.0  # many ties
    pos, neg = scores[positive], scores[~positive]
    wins = np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])
    pairwise = wins / (len(pos) * len(neg))
    assert metrics.roc_auc(positive, scores) == pytest.approx(pairwise)
    fpr, tpr = metrics.roc_curve(positive, scores)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(pairwise)


def matrix_images(matrix: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, probabilities)`` of images the matrix counts: random probabilities whose argmax is each one's cell."""
    cells = np.repeat(np.arange(matrix.size), matrix.ravel())
    y_true, y_pred = cells // len(matrix), cells % len(matrix)
    probabilities = np.random.default_rng(seed).dirichlet(np.ones(len(matrix)), size=len(cells))
    probabilities[np.arange(len(cells)), y_pred] += 1.0  # above every other class's share
    return y_true, probabilities / probabilities.sum(axis=1, keepdims=True)


def test_report_with_probabilities_adds_one_vs_rest_auc():
    y_true, probabilities = matrix_images(MATRIX)  # Virus (2) absent
    report = metrics.classification_report(MATRIX, CLASSES, y_true, probabilities)
    for i, name in enumerate(CLASSES):
        expected = metrics.roc_auc(y_true == i, probabilities[:, i])
        assert report["per_class"][name]["roc_auc"] == expected
    assert report["per_class"]["Virus"]["roc_auc"] is None
    defined = [report["per_class"][n]["roc_auc"] for n in ("Normal", "Bacteria", "COVID-19")]
    assert report["macro_roc_auc"] == pytest.approx(np.mean(defined))


def test_report_refuses_labels_that_do_not_fit_the_matrix():
    probabilities = np.full((12, 4), 0.25)
    with pytest.raises(ValueError, match="do not match"):
        metrics.classification_report(MATRIX, CLASSES, np.zeros(12, dtype=int), probabilities)
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_report(MATRIX, CLASSES, np.zeros(12, dtype=int), probabilities[:, :3])
    with pytest.raises(ValueError, match="both"):
        metrics.classification_report(MATRIX, CLASSES, probabilities=probabilities)
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([True, False], [np.nan, 0.1])


def test_report_refuses_a_matrix_that_is_not_the_argmax():
    y_true, probabilities = matrix_images(MATRIX)
    with pytest.raises(ValueError, match="argmax"):
        metrics.classification_report(MATRIX, CLASSES, y_true, probabilities[:, ::-1])


# --- precision-recall curve -------------------------------------------------------------------------

def test_precision_recall_curve_by_hand():
    # Descending: 0.9 hit (recall 1/2, precision 1), 0.8 miss (1/2, 1/2), 0.7 hit (1, 2/3), 0.1 miss (1, 1/2).
    recall, precision, average_precision = metrics.precision_recall_curve([True, False, True, False],
                                                                          [0.9, 0.8, 0.7, 0.1])
    np.testing.assert_allclose(recall, [0, 1 / 2, 1 / 2, 1, 1])
    np.testing.assert_allclose(precision, [1, 1, 1 / 2, 2 / 3, 1 / 2])
    assert average_precision == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 3)  # recall gained x precision: 5/6


def test_precision_recall_curve_ties_one_step_and_extremes():
    # 0.5 holds a hit and a miss: one step from (1/2, 1) to (1, 2/3).
    recall, precision, average_precision = metrics.precision_recall_curve([True, True, False, False],
                                                                          [0.9, 0.5, 0.5, 0.1])
    np.testing.assert_allclose(recall, [0, 1 / 2, 1, 1])
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 1 / 2])
    assert average_precision == pytest.approx(5 / 6)
    assert metrics.precision_recall_curve([True, True, False], [0.9, 0.8, 0.1])[2] == 1.0  # positives first
    assert metrics.precision_recall_curve([False, False], [0.2, 0.4]) is None


# --- intervals ------------------------------------------------------------------------------------

def per_class_scalars(report: dict) -> dict:
    """The report's scalars under their ci95 names."""
    scalars = {key: report[key] for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")}
    for name, stats in report["per_class"].items():
        scalars[f"recall_{name}"], scalars[f"specificity_{name}"] = stats["recall"], stats["specificity"]
    return scalars


def test_every_scalar_gets_an_interval_around_it_or_null():
    y_true, probabilities = matrix_images(MATRIX)
    report = metrics.classification_report(MATRIX, CLASSES, y_true, probabilities, resamples=500)
    scalars = per_class_scalars(report)
    assert set(report["ci95"]) == set(scalars)  # recall_COVID-19: the class as per_class spells it
    for name, point in scalars.items():
        interval = report["ci95"][name]
        if point is None:
            assert interval is None, name
        else:
            assert interval[0] <= point <= interval[1], name
    assert report["ci95"]["recall_Virus"] is None and report["ci95"]["specificity_Virus"] is not None
    # Stratified: COVID-19 keeps its 2 images, one right, so its recall moves only with them.
    assert report["ci95"]["recall_COVID-19"] == [0.0, 1.0]
    assert json.loads(json.dumps(report, allow_nan=False))["ci95"] == report["ci95"]


def test_matrix_alone_gets_intervals_of_its_counts():
    report = metrics.classification_report(MATRIX, CLASSES, resamples=500)
    assert "macro_roc_auc" not in report["ci95"]
    low, high = report["ci95"]["accuracy"]
    assert low < 8 / 12 < high
    assert metrics.classification_report(np.zeros((2, 2), dtype=int), ("a", "b"), resamples=10)["ci95"] == {
        "accuracy": None, "balanced_accuracy": None, "macro_f1": None, "recall_a": None, "specificity_a": None,
        "recall_b": None, "specificity_b": None}


def test_intervals_are_reproducible_for_a_seed():
    y_true, probabilities = matrix_images(MATRIX)
    first, again, other = (metrics.classification_report(MATRIX, CLASSES, y_true, probabilities, resamples=300,
                                                         seed=seed)["ci95"] for seed in (3, 3, 4))
    assert first == again and first != other


def test_a_resample_is_the_images_it_repeats():
    """Weights are image counts: the metrics of a weighting equal the report of the repeated images."""
    y_true, probabilities = matrix_images(MATRIX)
    y_pred = probabilities.argmax(axis=1)
    weights = np.random.default_rng(2).integers(0, 3, size=len(y_true))
    weighted = metrics.metric_values(weights[None].astype(float), y_true, y_pred, CLASSES, probabilities)
    repeated_true, repeated_probabilities = np.repeat(y_true, weights), np.repeat(probabilities, weights, axis=0)
    matrix = metrics.confusion_matrix(repeated_true, repeated_probabilities.argmax(axis=1), len(CLASSES))
    report = metrics.classification_report(matrix, CLASSES, repeated_true, repeated_probabilities, resamples=1)
    for name, point in per_class_scalars(report).items():
        assert weighted[name][0] == (pytest.approx(point) if point is not None else pytest.approx(np.nan, nan_ok=True))


def test_patient_groups_are_drawn_together():
    """Three identical images per patient resampled by patient: the intervals of one image per patient.

    Patients are named in the images' order, so both draw the same way; without the groups the
    tripled images look like three times the evidence and the intervals shrink.
    """
    y_true, probabilities = matrix_images(MATRIX)
    alone = metrics.classification_report(MATRIX, CLASSES, y_true, probabilities, resamples=400)["ci95"]
    tripled = dict(matrix=3 * MATRIX, class_names=CLASSES, y_true=np.repeat(y_true, 3),
                   probabilities=np.repeat(probabilities, 3, axis=0), resamples=400)
    patients = [f"patient{i:03d}" for i in np.repeat(np.arange(len(y_true)), 3)]
    grouped = metrics.classification_report(**tripled, groups=patients)["ci95"]
    assert grouped == pytest.approx(alone)
    ungrouped = metrics.classification_report(**tripled)["ci95"]["accuracy"]
    assert ungrouped[1] - ungrouped[0] < alone["accuracy"][1] - alone["accuracy"][0]


def test_bad_bootstrap_arguments_are_refused():
    y_true, probabilities = matrix_images(MATRIX)
    with pytest.raises(ConfigError, match="resamples"):
        metrics.classification_report(MATRIX, CLASSES, resamples=0)
    with pytest.raises(ValueError, match="3 patient groups for 12 images"):
        metrics.classification_report(MATRIX, CLASSES, y_true, probabilities, groups=["a", "b", "c"])
    with pytest.raises(ValueError, match="in the groups' order"):
        metrics.classification_report(MATRIX, CLASSES, groups=["a"] * 12)


def test_the_epoch_metrics_of_a_split_are_those_of_the_report():
    """Balanced accuracy and macro F1 as fit logs them (over batches) equal the NumPy report's on the same images."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 40)
    probabilities = rng.dirichlet(np.ones(3), 40)
    matrix = metrics.confusion_matrix(labels, probabilities.argmax(1), 3)
    report = metrics.classification_report(matrix, ["a", "b", "c"], labels, probabilities, resamples=10)
    logged = {}
    for metric in metrics.epoch_metrics(["a", "b", "c"]):
        for start in range(0, 40, 16):  # in batches, as fit feeds them
            metric.update_state(np.eye(3)[labels[start:start + 16]], probabilities[start:start + 16])
        logged[metric.name] = float(metric.result())
    assert logged["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"], abs=1e-6)
    assert logged["macro_f1"] == pytest.approx(report["macro_f1"], abs=1e-6)
    assert logged["macro_auc"] == pytest.approx(report["macro_roc_auc"], abs=0.01)  # 500 thresholds
    assert logged["accuracy"] == pytest.approx(report["accuracy"])


def test_balanced_accuracy_leaves_out_classes_absent_from_the_split():
    metric = metrics.BalancedAccuracy(3)
    metric.update_state(np.eye(3)[[0, 0, 1, 1]], np.eye(3)[[0, 1, 1, 1]])
    assert float(metric.result()) == pytest.approx((0.5 + 1.0) / 2)
