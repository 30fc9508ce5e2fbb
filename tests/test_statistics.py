"""Bootstrap resampling, percentile intervals and McNemar's test against hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from xray_tf import metrics, statistics


@pytest.fixture(autouse=True)
def no_warnings():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


def test_accuracy_interval_matches_the_normal_approximation():
    # Every class is 80 % right, so the stratified estimator's variance is the binomial one,
    # p (1 - p) / n: sum over classes of (n_c / n)^2 p (1 - p) / n_c.
    matrix = np.array([[160, 30, 10], [40, 240, 20], [5, 15, 80]])  # 600 images, accuracy 0.8
    report = metrics.classification_report(matrix, ("a", "b", "c"), seed=0)
    low, high = report["ci95"]["accuracy"]
    normal_width = 2 * 1.959964 * math.sqrt(0.8 * 0.2 / 600)
    assert abs((high - low) - normal_width) / normal_width < 0.10
    assert report["accuracy"] == pytest.approx(0.8) and low < 0.8 < high
    assert metrics.classification_report(matrix, ("a", "b", "c"), seed=0)["ci95"]["accuracy"] == [low, high]


def test_resamples_keep_each_class_size_and_bounded_blocks(monkeypatch):
    monkeypatch.setattr(statistics, "_BLOCK_ELEMENTS", 100)  # 10 resamples per block of 10 images
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    blocks = list(statistics.resample_weights(labels, resamples=25, seed=1))
    assert [len(block) for block in blocks] == [10, 10, 5]
    weights = np.concatenate(blocks)
    assert np.all(weights == np.round(weights)) and weights.min() >= 0
    for label, size in ((0, 4), (1, 3), (2, 3)):
        assert np.all(weights[:, labels == label].sum(axis=1) == size)
    assert len({tuple(row) for row in weights}) > 20  # the resamples differ


def test_groups_are_drawn_whole_within_their_majority_class():
    labels = np.array([0, 0, 1, 1, 1, 0, 1])
    groups = ["p1", "p1", "p2", "p2", "p3", "p4", "p4"]  # p4 is mixed: half 0, half 1, so stratum 0
    weights = np.concatenate(list(statistics.resample_weights(labels, groups, resamples=200, seed=0)))
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 2] == weights[:, 3])
    assert np.all(weights[:, 5] == weights[:, 6])
    # Stratum 0 holds p1 and p4 (two draws), stratum 1 holds p2 and p3 (two draws).
    assert np.all(weights[:, 0] + weights[:, 5] == 2) and np.all(weights[:, 2] + weights[:, 4] == 2)
    with pytest.raises(ValueError, match="missing"):
        next(statistics.resample_weights(labels, ["p1", None, "p2", "p2", "p3", "p4", "p4"]))


def test_paired_differences_cancel_what_the_runs_share():
    labels = np.repeat([0, 1], 50)
    rng = np.random.default_rng(0)
    correct_a = rng.random(100) < 0.7
    correct_b = correct_a.copy()
    correct_b[:5] = ~correct_b[:5]  # B differs from A on 5 images only

    def accuracy(correct):
        return lambda weights: {"accuracy": weights @ correct / weights.sum(axis=1)}

    same = statistics.paired_differences(accuracy(correct_a), accuracy(correct_a), labels, resamples=300)
    assert np.all(same["accuracy"] == 0.0)
    paired = statistics.paired_differences(accuracy(correct_a), accuracy(correct_b), labels, resamples=300)
    unpaired_a = statistics.bootstrap(accuracy(correct_a), labels, resamples=300, seed=1)["accuracy"]
    unpaired_b = statistics.bootstrap(accuracy(correct_b), labels, resamples=300, seed=2)["accuracy"]
    assert np.std(paired["accuracy"]) < 0.5 * np.std(unpaired_a - unpaired_b)


def test_percentile_interval_and_its_null_rule():
    values = np.arange(1, 1001, dtype=float)
    assert statistics.percentile_interval(values, 500.0) == pytest.approx([25.975, 975.025])
    assert statistics.percentile_interval(values, None) is None  # undefined point estimate
    assert statistics.percentile_interval(values, float("nan")) is None
    some_undefined = values.copy()
    some_undefined[:25] = np.nan  # 2.5 %: as many as one tail, still an interval of the rest
    assert statistics.percentile_interval(some_undefined, 500.0)[0] == pytest.approx(np.percentile(values[25:], 2.5))
    some_undefined[25] = np.nan  # more than one tail's worth: no interval
    assert statistics.percentile_interval(some_undefined, 500.0) is None


@pytest.mark.parametrize("only_a, only_b, expected", [
    (1, 7, 2 * (math.comb(8, 0) + math.comb(8, 1)) / 2**8),  # 2 * 9/256 = 0.0703125
    (7, 1, 0.0703125),  # two-sided: symmetric
    (3, 3, 1.0),  # the tail with the middle term exceeds one half: capped
    (0, 0, 1.0),  # no discordant image: no evidence
    (0, 10, 2 / 2**10),
])
def test_mcnemar_matches_the_exact_binomial(only_a, only_b, expected):
    assert statistics.mcnemar_p_value(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        statistics.mcnemar_p_value(-1, 3)
