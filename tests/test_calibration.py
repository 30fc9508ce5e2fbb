"""Temperature scaling, expected calibration error, operating points and the run files that keep them."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from xray_tf import calibration, plots, rundir
from xray_tf.calibration import OperatingPoint
from xray_tf.config import ConfigError

CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated_case() -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are calibrated by construction: each label is drawn from them."""
    rng = np.random.default_rng(0)
    probabilities = softmax(1.5 * rng.normal(size=(4000, 4)))
    labels = (rng.uniform(size=(4000, 1)) > probabilities.cumsum(axis=1)).sum(axis=1)
    return probabilities, labels


def test_temperature_scaling_lowers_the_nll_of_an_over_confident_model(calibrated_case):
    probabilities, labels = calibrated_case
    over_confident = softmax(3.0 * np.log(probabilities))  # the logits of a calibrated model, times 3
    temperature = calibration.fit_temperature(over_confident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = calibration.negative_log_likelihood(over_confident, labels)
    after = calibration.negative_log_likelihood(over_confident, labels, temperature)
    assert after < before - 0.2
    assert after == pytest.approx(calibration.negative_log_likelihood(probabilities, labels), abs=0.01)
    scaled = calibration.apply_temperature(over_confident, temperature)
    assert (scaled.argmax(axis=1) == over_confident.argmax(axis=1)).all()  # no prediction changes class
    fitted = calibration.calibrate(over_confident, labels)
    assert fitted["temperature"] == pytest.approx(temperature)
    assert fitted["ece"]["after"] < 0.03 < 0.15 < fitted["ece"]["before"]
    assert fitted["nll"]["after"] == pytest.approx(after) and fitted["num_images"] == 4000


def test_fitted_temperature_is_the_minimum_of_the_nll(calibrated_case):
    probabilities, labels = calibrated_case
    temperature = calibration.fit_temperature(probabilities, labels)
    nll = calibration.negative_log_likelihood(probabilities, labels, temperature)
    for nearby in (temperature * 0.97, temperature * 1.03):
        assert calibration.negative_log_likelihood(probabilities, labels, nearby) > nll


def test_ece_is_near_zero_when_calibrated_by_construction():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, 20_000)
    correct = rng.uniform(size=20_000) < confidence  # right exactly as often as it is confident
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.where(correct, 0, 1)
    assert calibration.expected_calibration_error(probabilities, labels) < 0.015
    always_right = np.zeros(20_000, dtype=int)  # the same confidences, never wrong: badly calibrated
    assert calibration.expected_calibration_error(probabilities, always_right) == pytest.approx(0.25, abs=0.01)


def test_reliability_bins_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong) and 0.5 (right; argmax takes the first of a tie).
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])
    labels = np.array([0, 1, 0])
    bins = calibration.reliability(probabilities, labels)
    assert bins["bins"] == 15 and len(bins["edges"]) == 16 and sum(bins["count"]) == 3
    assert bins["count"][13] == 2 and bins["accuracy"][13] == 0.5 and bins["confidence"][13] == pytest.approx(0.9)
    assert bins["count"][7] == 1 and bins["accuracy"][7] == 1.0  # 0.5 lies in (7/15, 8/15]
    assert bins["accuracy"][0] is None and bins["confidence"][0] is None  # empty: undefined, not 0
    assert bins["ece"] == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.5)
    # A confidence of exactly 1/15 (15 equal classes) closes the first bin, (0, 1/15]; 1.0 closes the last.
    assert calibration.reliability(np.full((1, 15), 1 / 15), [0])["count"][0] == 1
    assert calibration.reliability(np.eye(15)[:1], [0])["count"][14] == 1


def test_temperature_handles_zero_probabilities_without_warnings():
    probabilities = np.array([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = calibration.apply_temperature(probabilities, 2.0)
        assert np.isfinite(calibration.negative_log_likelihood(probabilities, [0, 1], 2.0))
    assert np.allclose(scaled.sum(axis=1), 1.0) and (scaled[:, 2] < 1e-100).all()
    assert scaled[1, 1] == pytest.approx(2.0 / (2.0 + 1.0))  # sqrt(0.8) / (sqrt(0.8) + sqrt(0.2))
    assert calibration.apply_temperature(probabilities, None) is probabilities
    with pytest.raises(ValueError, match="positive number"):
        calibration.apply_temperature(probabilities, 0.0)
    with pytest.raises(ValueError, match="class indices below 3"):
        calibration.fit_temperature(probabilities, [0, 3])


@pytest.mark.parametrize("spec, expected", [
    ("COVID-19:sensitivity=0.95", OperatingPoint("COVID-19", "sensitivity", 0.95)),
    ("covid_19:specificity=0.9", OperatingPoint("COVID-19", "specificity", 0.9)),
    ("Normal:sensitivity=1", OperatingPoint("Normal", "sensitivity", 1.0)),
])
def test_operating_point_specs(spec, expected):
    point = calibration.parse_operating_point(spec, CLASSES)
    assert point == expected
    assert calibration.parse_operating_point(point.key, CLASSES) == point


@pytest.mark.parametrize("spec, problem", [
    ("COVID-19", "expected CLASS:sensitivity=TARGET"),
    ("COVID-19:sensitivity", "expected CLASS:sensitivity=TARGET"),
    ("Cat:sensitivity=0.9", "'Cat' is not one of the classes"),
    ("COVID-19:recall=0.9", "'recall' is not one of sensitivity, specificity"),
    ("COVID-19:sensitivity=95", r"not in \(0, 1\] \(a share, not a percentage\)"),
    ("COVID-19:sensitivity=0", r"not in \(0, 1\]"),
    ("COVID-19:sensitivity=high", "'high' is not a number"),
])
def test_bad_operating_point_specs_name_the_flag(spec, problem):
    with pytest.raises(ConfigError, match=problem) as error:
        calibration.parse_operating_point(spec, CLASSES)
    assert error.value.as_flag().startswith(f"--operating_point={spec}: ")


def test_operating_points_are_one_per_class():
    specs = ["covid_19:sensitivity=0.95", "Normal:specificity=0.9"]
    assert calibration.parse_operating_points(specs, CLASSES) == [OperatingPoint("COVID-19", "sensitivity", 0.95),
                                                                   OperatingPoint("Normal", "specificity", 0.9)]
    assert calibration.parse_operating_points([], CLASSES) == []
    with pytest.raises(ConfigError, match="^operating_point='COVID-19:specificity=0.5': a second operating point "
                                          "for COVID-19: one per class") as error:
        calibration.parse_operating_points([*specs, "COVID-19:specificity=0.5"], CLASSES)
    assert error.value.field == "operating_point"
    with pytest.raises(ConfigError, match="'Cat' is not one of the classes") as error:
        calibration.parse_operating_points(["Cat:sensitivity=0.9"], CLASSES, field="point")
    assert error.value.field == "point"


def test_sensitivity_threshold_is_the_largest_that_reaches_the_target():
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=200)
    is_positive = rng.uniform(size=200) < scores  # higher scores are more often positive
    threshold = calibration.choose_threshold(is_positive, scores, "sensitivity", 0.95)
    rates = calibration.rates_at_threshold(is_positive, scores, threshold)
    assert rates["sensitivity"] >= 0.95
    higher = np.min(scores[scores > threshold])  # the next threshold up misses the target
    assert calibration.rates_at_threshold(is_positive, scores, higher)["sensitivity"] < 0.95
    # 20 positives at 0.95: 19 must be flagged (0.95 * 20 is 19 in floating point only approximately).
    twenty = np.arange(20) / 20.0
    assert calibration.choose_threshold(np.ones(20, bool), twenty, "sensitivity", 0.95) == twenty[1]


def test_specificity_threshold_is_the_smallest_that_reaches_the_target():
    rng = np.random.default_rng(3)
    scores = np.round(rng.uniform(size=300), 2)  # with ties
    is_positive = rng.uniform(size=300) < scores
    threshold = calibration.choose_threshold(is_positive, scores, "specificity", 0.9)
    rates = calibration.rates_at_threshold(is_positive, scores, threshold)
    assert rates["specificity"] >= 0.9
    lower = np.max(scores[scores < threshold])  # one step down flags a negative too many
    assert calibration.rates_at_threshold(is_positive, scores, lower)["specificity"] < 0.9
    with pytest.raises(ValueError, match="No negative images"):
        calibration.choose_threshold(np.ones(3, bool), [0.1, 0.2, 0.3], "specificity", 0.9)
    with pytest.raises(ValueError, match="No positive images"):
        calibration.choose_threshold(np.zeros(3, bool), [0.1, 0.2, 0.3], "sensitivity", 0.9)


def test_rates_at_threshold_count_and_bound_by_hand():
    is_positive = np.array([True, True, True, True, False, False, False, False, False, False])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.0])
    rates = calibration.rates_at_threshold(is_positive, scores, 0.5, seed=1)
    assert (rates["true_positives"], rates["positives"], rates["true_negatives"], rates["negatives"]) == (3, 4, 5, 6)
    assert rates["sensitivity"] == 0.75 and rates["specificity"] == pytest.approx(5 / 6)
    low, high = rates["sensitivity_ci95"]
    assert 0.0 <= low < 0.75 < high <= 1.0
    assert rates == calibration.rates_at_threshold(is_positive, scores, 0.5, seed=1)  # seeded
    without_negatives = calibration.rates_at_threshold(is_positive[:4], scores[:4], 0.5)
    assert without_negatives["specificity"] is None and without_negatives["specificity_ci95"] is None


def test_operating_points_are_stored_with_how_their_probabilities_were_made(tmp_path):
    point = OperatingPoint("COVID-19", "sensitivity", 0.95)
    entry = {"class": "COVID-19", "threshold": 0.25, "temperature": 1.5, "tta": "flip"}
    with pytest.raises(ConfigError, match="no threshold stored in .*xray-evaluate --run_dir=.* "
                                          "--operating_point=COVID-19:sensitivity=0.95"):
        calibration.stored_threshold(str(tmp_path), point, 1.5, "flip")
    calibration.write_operating_points(str(tmp_path), {point.key: entry})
    other = OperatingPoint("Normal", "specificity", 0.9)
    calibration.write_operating_points(str(tmp_path), {other.key: {**entry, "threshold": 0.7}})  # merged, not replaced
    assert set(calibration.read_operating_points(str(tmp_path))) == {point.key, other.key}
    assert calibration.stored_threshold(str(tmp_path), point, 1.5, "flip") == 0.25
    with pytest.raises(ConfigError, match="chosen with temperature 1.5 and --tta=flip, not temperature None"):
        calibration.stored_threshold(str(tmp_path), point, None, "flip")
    with pytest.raises(ConfigError, match="--tta=flip, not temperature 1.5 and --tta=none"):
        calibration.stored_threshold(str(tmp_path), point, 1.5, "none")


def test_temperature_file(tmp_path):
    assert calibration.read_temperature(str(tmp_path)) is None  # never calibrated
    calibration.write_calibration(str(tmp_path), {"temperature": 1.7, "num_images": 9})
    assert calibration.read_temperature(str(tmp_path)) == 1.7
    (tmp_path / rundir.CALIBRATION).write_text(json.dumps({"temperature": -1}))
    with pytest.raises(rundir.RunError, match="calibration.json: no positive 'temperature'"):
        calibration.read_temperature(str(tmp_path))


def test_reliability_figure_draws_the_filled_bins(calibrated_case):
    probabilities, labels = calibrated_case
    bins = calibration.reliability(probabilities, labels)
    figure = plots.reliability_figure(bins, "val")
    accuracy_axes, count_axes = figure.axes
    filled = sum(count > 0 for count in bins["count"])
    assert len(accuracy_axes.patches) == filled and len(count_axes.patches) == 15
    assert "ECE" in accuracy_axes.get_title()
