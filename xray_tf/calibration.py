"""Calibration and operating points: how far to trust a probability, and where to cut it.

* Temperature scaling: the models end in a softmax, so their log-probabilities are logits up to a
  per-image constant, and ``softmax(log p / T)`` is the temperature-scaled prediction. One ``T`` is
  fitted on the validation split by minimising the negative log-likelihood (NLL); ``T > 1`` softens
  an over-confident model, and no prediction's class changes.
* Expected calibration error (ECE): the top-label confidence in 15 equal-width bins, and the
  image-weighted mean gap between each bin's accuracy and its mean confidence; the bins are what a
  reliability diagram draws.
* Operating points: ``CLASS:sensitivity=0.95`` (or ``CLASS:specificity=0.9``) picks one threshold on
  a class's probability on validation; an image is flagged as that class when its probability is at
  least the threshold. Its sensitivity and specificity elsewhere come with bootstrap 95 % intervals.

Everything here is NumPy on arrays, except the readers and writers of the run's
``calibration.json`` and ``operating_points.json`` at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from xray_tf import rundir, statistics
from xray_tf.config import ConfigError
from xray_tf.metrics import metric_suffix

ECE_BINS = 15
CRITERIA = ("sensitivity", "specificity")
# Golden-section search on log T over [1/20, 20]: wide enough for any network seen in practice
# (fitted values are typically 1 to 3), narrow enough that a degenerate split cannot run off.
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))
_LOG_T_TOLERANCE = 1e-6


def _checked(probabilities: np.ndarray, y_true: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if probabilities.ndim != 2 or len(probabilities) != len(y_true) or not len(y_true):
        raise ValueError(f"Expected probabilities [n, k] and n labels (n >= 1), got shapes {probabilities.shape} "
                         f"and {y_true.shape}.")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("Probabilities contain NaN or infinity; the model's outputs are not usable.")
    if y_true.min() < 0 or y_true.max() >= probabilities.shape[1]:
        raise ValueError(f"Labels must be class indices below {probabilities.shape[1]}.")
    return probabilities, y_true


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    # A float32 softmax underflows to exactly 0: the smallest positive double stands in for it,
    # so the logarithm stays finite and such a class stays the least likely under any temperature.
    return np.log(np.maximum(probabilities, np.finfo(np.float64).tiny))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def apply_temperature(probabilities: np.ndarray, temperature: float | None) -> np.ndarray:
    """``softmax(log(probabilities) / temperature)``; ``None`` returns the probabilities as they are."""
    if temperature is None:
        return np.asarray(probabilities)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"The temperature must be a positive number, got {temperature}.")
    return _softmax(_log_probabilities(np.asarray(probabilities, dtype=np.float64)) / temperature)


def _nll_at(log_p: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    scaled = log_p / temperature
    top = scaled.max(axis=-1)
    log_normaliser = top + np.log(np.exp(scaled - top[:, None]).sum(axis=-1))
    return float(np.mean(log_normaliser - scaled[np.arange(len(y_true)), y_true]))


def negative_log_likelihood(probabilities: np.ndarray, y_true: Sequence[int],
                            temperature: float | None = None) -> float:
    """Mean ``-log p(true class)`` per image, after ``temperature`` if given."""
    probabilities, y_true = _checked(probabilities, y_true)
    return _nll_at(_log_probabilities(probabilities), y_true, 1.0 if temperature is None else temperature)


def fit_temperature(probabilities: np.ndarray, y_true: Sequence[int]) -> float:
    """The temperature that minimises the NLL of ``probabilities`` for ``y_true``.

    The NLL is convex in ``1 / T`` (a log-sum-exp of functions linear in it, minus a linear term),
    so it has one minimum along ``log T`` too, which a golden-section search finds without gradients.
    """
    probabilities, y_true = _checked(probabilities, y_true)
    log_p = _log_probabilities(probabilities)

    def nll(log_t: float) -> float:
        return _nll_at(log_p, y_true, math.exp(log_t))

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = _LOG_T_RANGE
    inner_low, inner_high = high - ratio * (high - low), low + ratio * (high - low)
    value_low, value_high = nll(inner_low), nll(inner_high)
    while high - low > _LOG_T_TOLERANCE:
        if value_low <= value_high:
            high, inner_high, value_high = inner_high, inner_low, value_low
            inner_low = high - ratio * (high - low)
            value_low = nll(inner_low)
        else:
            low, inner_low, value_low = inner_low, inner_high, value_high
            inner_high = low + ratio * (high - low)
            value_high = nll(inner_high)
    return math.exp((low + high) / 2.0)


def reliability(probabilities: np.ndarray, y_true: Sequence[int], bins: int = ECE_BINS) -> dict:
    """Top-label reliability in ``bins`` equal-width confidence bins, and the ECE they give.

    Bin ``b`` holds confidences in ``(b / bins, (b + 1) / bins]`` (the first one includes 0). Returns
    ``{"bins", "edges", "count", "confidence", "accuracy", "ece"}``: per bin its image count, mean
    confidence and accuracy (``None`` for an empty bin), and ``ece`` = sum over bins of
    ``count / n * |accuracy - confidence|``.
    """
    probabilities, y_true = _checked(probabilities, y_true)
    confidence = probabilities.max(axis=-1)
    correct = (probabilities.argmax(axis=-1) == y_true).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    filled = count > 0
    mean_confidence = np.bincount(which, confidence, minlength=bins)[filled] / count[filled]
    accuracy = np.bincount(which, correct, minlength=bins)[filled] / count[filled]
    ece = float(np.sum(count[filled] / len(y_true) * np.abs(accuracy - mean_confidence)))

    def per_bin(values: np.ndarray) -> list[float | None]:
        spread = np.full(bins, np.nan)
        spread[filled] = values
        return [None if np.isnan(v) else float(v) for v in spread]

    return {"bins": bins, "edges": np.linspace(0.0, 1.0, bins + 1).tolist(), "count": count.tolist(),
            "confidence": per_bin(mean_confidence), "accuracy": per_bin(accuracy), "ece": ece}


def expected_calibration_error(probabilities: np.ndarray, y_true: Sequence[int], bins: int = ECE_BINS) -> float:
    """ECE of the top-label confidence in ``bins`` equal-width bins (see ``reliability``)."""
    return reliability(probabilities, y_true, bins)["ece"]


def calibrate(probabilities: np.ndarray, y_true: Sequence[int]) -> dict:
    """Fit the temperature on these (validation) probabilities: ``calibration.json``'s content.

    ``{"temperature", "num_images", "nll": {"before", "after"}, "ece": {"before", "after"}, "ece_bins"}``.
    """
    temperature = fit_temperature(probabilities, y_true)
    scaled = apply_temperature(probabilities, temperature)
    return {
        "temperature": temperature,
        "num_images": len(y_true),
        "nll": {"before": negative_log_likelihood(probabilities, y_true),
                "after": negative_log_likelihood(probabilities, y_true, temperature)},
        "ece": {"before": expected_calibration_error(probabilities, y_true),
                "after": expected_calibration_error(scaled, y_true)},
        "ece_bins": ECE_BINS,
    }


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """A threshold rule for one class: reach ``target`` ``criterion`` (sensitivity or specificity)."""

    class_name: str
    criterion: str
    target: float

    @property
    def key(self) -> str:
        """The canonical spelling, ``COVID-19:sensitivity=0.95``: how the point is stored and looked up."""
        return f"{self.class_name}:{self.criterion}={self.target:g}"


def parse_operating_point(spec: str, class_names: Sequence[str], field: str = "operating_point") -> OperatingPoint:
    """``CLASS:sensitivity=0.95`` or ``CLASS:specificity=0.9`` as an ``OperatingPoint``.

    CLASS is a class name or its ``metric_suffix`` (``covid_19`` for COVID-19); the target is in (0, 1].
    A spec that does not fit raises ``ConfigError(field, spec, why)``.
    """
    name, colon, rule = spec.rpartition(":")
    criterion, equals, target_text = rule.partition("=")
    if not (colon and equals and name):
        raise ConfigError(field, spec, "expected CLASS:sensitivity=TARGET or CLASS:specificity=TARGET, "
                          "e.g. COVID-19:sensitivity=0.95.")
    matches = [c for c in class_names if name in (c, metric_suffix(c))]
    if not matches:
        raise ConfigError(field, spec, f"{name!r} is not one of the classes {', '.join(class_names)}.")
    if criterion not in CRITERIA:
        raise ConfigError(field, spec, f"{criterion!r} is not one of {', '.join(CRITERIA)}.")
    try:
        target = float(target_text)
    except ValueError:
        raise ConfigError(field, spec, f"the target {target_text!r} is not a number.") from None
    if not 0.0 < target <= 1.0:
        raise ConfigError(field, spec, f"the target {target_text} is not in (0, 1] (a share, not a percentage).")
    return OperatingPoint(matches[0], criterion, target)


def parse_operating_points(specs: Sequence[str], class_names: Sequence[str],
                           field: str = "operating_point") -> list[OperatingPoint]:
    """``parse_operating_point`` of each spec, at most one per class: each makes its class's flag column.

    A second point for a class raises ``ConfigError(field, spec, why)``, as a spec that does not fit does.
    """
    points = [parse_operating_point(spec, class_names, field) for spec in specs]
    for i, point in enumerate(points):
        if any(other.class_name == point.class_name for other in points[:i]):
            raise ConfigError(field, specs[i], f"a second operating point for {point.class_name}: one per class "
                              "(each makes its class's flag column).")
    return points


def _binary(is_positive: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    is_positive, scores = np.asarray(is_positive, dtype=bool), np.asarray(scores, dtype=np.float64)
    if is_positive.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"Expected two equal 1-D arrays, got shapes {is_positive.shape} and {scores.shape}.")
    return is_positive, scores


def _at_least(target: float, count: int) -> int:
    """The fewest of ``count`` images that make a share of at least ``target`` (0.95 * 20 is 19, not 20)."""
    return max(1, math.ceil(target * count - 1e-9))


def choose_threshold(is_positive: Sequence[bool], scores: Sequence[float], criterion: str, target: float) -> float:
    """The threshold on ``scores`` (flag when ``score >= threshold``) that meets ``target`` on these images.

    ``sensitivity``: the largest threshold whose sensitivity is at least ``target``, which keeps
    the most specificity. ``specificity``: the smallest threshold whose specificity is at least
    ``target`` (just above the negative score that must stay unflagged), which keeps the most
    sensitivity; the largest would flag nothing. Raises ValueError without positives (negatives).
    """
    is_positive, scores = _binary(is_positive, scores)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}.")
    if criterion == "sensitivity":
        positives = np.sort(scores[is_positive])[::-1]
        if not len(positives):
            raise ValueError("No positive images: no sensitivity to reach.")
        # The k highest positive scores must be flagged; a tie below the k-th is flagged too.
        return float(positives[_at_least(target, len(positives)) - 1])
    negatives = np.sort(scores[~is_positive])
    if not len(negatives):
        raise ValueError("No negative images: no specificity to reach.")
    kept = _at_least(target, len(negatives))  # negatives that must stay below the threshold
    return float(np.nextafter(negatives[kept - 1], np.inf))


def rates_at_threshold(is_positive: Sequence[bool], scores: Sequence[float], threshold: float,
                       groups: Sequence[object] | None = None, seed: int = 0) -> dict:
    """Sensitivity and specificity of flagging ``score >= threshold``, with counts and bootstrap 95 % intervals.

    The intervals are the classification report's (``statistics.bootstrap``: stratified by
    positive / negative, a patient's images drawn together where ``groups`` gives patient ids). A
    rate with a zero denominator, and its interval, is ``None``.
    """
    is_positive, scores = _binary(is_positive, scores)
    flagged = scores >= threshold
    columns = np.stack([flagged & is_positive, is_positive, ~flagged & ~is_positive, ~is_positive]).T.astype(float)

    def rates(weights: np.ndarray) -> dict[str, np.ndarray]:
        true_positives, positives, true_negatives, negatives = (weights @ columns).T
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without negatives: NaN, undefined
            return {"sensitivity": true_positives / positives, "specificity": true_negatives / negatives}

    counts = columns.sum(axis=0).astype(int)
    points = {name: None if np.isnan(value[0]) else float(value[0])
              for name, value in rates(np.ones((1, len(scores)))).items()}
    ci95 = statistics.intervals(statistics.bootstrap(rates, is_positive.astype(int), groups, seed=seed), points)
    return {
        "threshold": threshold,
        "sensitivity": points["sensitivity"], "sensitivity_ci95": ci95["sensitivity"],
        "specificity": points["specificity"], "specificity_ci95": ci95["specificity"],
        "true_positives": int(counts[0]), "positives": int(counts[1]),
        "true_negatives": int(counts[2]), "negatives": int(counts[3]),
    }


# The run's files. A threshold is only valid for the probabilities it was chosen on, so each
# stored point records the temperature and test-time augmentation it was chosen with.

def read_temperature(run_dir: str) -> float | None:
    """The run's fitted temperature (``calibration.json``), or None when it was never calibrated."""
    path = os.path.join(run_dir, rundir.CALIBRATION)
    if not os.path.isfile(path):
        return None
    stored = rundir.read_json(path)
    temperature = stored.get("temperature") if isinstance(stored, dict) else None
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise rundir.RunError(f"{path}: no positive 'temperature' in it.")
    return float(temperature)


def write_calibration(run_dir: str, fitted: dict) -> None:
    """Store ``calibrate``'s result (plus whatever the caller adds) as the run's ``calibration.json``."""
    rundir.write_json(os.path.join(run_dir, rundir.CALIBRATION), fitted)


def read_operating_points(directory: str) -> dict[str, dict]:
    """``key -> stored point`` of ``directory``'s ``operating_points.json`` (empty when absent)."""
    path = os.path.join(directory, rundir.OPERATING_POINTS)
    if not os.path.isfile(path):
        return {}
    stored = rundir.read_json(path)
    if not isinstance(stored, dict):
        raise rundir.RunError(f"{path}: expected an object of operating points.")
    return stored


def write_operating_points(directory: str, points: dict[str, dict]) -> None:
    """Add ``points`` (``key -> entry``) to ``directory``'s ``operating_points.json``, replacing equal keys."""
    rundir.write_json(os.path.join(directory, rundir.OPERATING_POINTS), {**read_operating_points(directory), **points})


def stored_threshold(directory: str, point: OperatingPoint, temperature: float | None, tta: str) -> float:
    """The threshold stored for ``point``, checked to have been chosen on probabilities made the same way.

    Raises ConfigError (field ``operating_point``) when none is stored, or when it was chosen with
    another temperature (calibration added, refitted or turned off since) or test-time augmentation.
    """
    entry = read_operating_points(directory).get(point.key)
    how = f"choose it on validation with xray-evaluate --run_dir={directory} --operating_point={point.key}"
    if entry is None:
        raise ConfigError("operating_point", point.key, f"no threshold stored in {directory}: {how}.")
    chosen_t = entry.get("temperature")
    same_t = (chosen_t is None) == (temperature is None) and (temperature is None or
                                                               math.isclose(chosen_t, temperature, rel_tol=1e-9))
    if not same_t or entry.get("tta") != tta:
        raise ConfigError("operating_point", point.key, f"its threshold was chosen with temperature {chosen_t} and "
                          f"--tta={entry.get('tta')}, not temperature {temperature} and --tta={tta}; use those, "
                          f"or {how} (with the same --tta and calibration).")
    return float(entry["threshold"])
