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


def test_report_with_probabilities_adds_one_vs_rest_auc():
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 3, 3])  # the rows of MATRIX; Virus (2) absent
    probabilities = np.random.default_rng(1).dirichlet(np.ones(4), size=12)
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
