"""Bootstrap intervals and the exact McNemar test, for the classification report and run comparisons.

A split's metrics are estimates from a few hundred or thousand images; the bootstrap says how far
they could move with other images of the same kind. Resampling is

* stratified by class: each class keeps as many draws as it has images (or patients), because the
  split's class mix is fixed by the dataset, not by chance, and a resample without COVID-19 images
  would leave the COVID-19 recall undefined;
* by patient where patient ids exist: a patient's images are drawn together, because images of one
  child are not independent evidence. A patient goes to the stratum of the class most of its images
  have (ties: the lowest class index), so a patient is never split between strata;
* seeded: the same images, groups and seed give the same interval.

A resample is held as a weight per image -- how many times it was drawn -- so a metric of every
resample is a few array operations on a ``[resamples, images]`` block instead of a Python loop;
blocks are bounded in size so that memory does not grow with the resample count.

Intervals are percentile intervals. An interval is ``None`` (null in JSON) when the point estimate
is undefined, or when the metric is undefined in more than (1 - confidence) / 2 of the resamples
(2.5 % for 95 %): the resamples missing could be a whole tail, so no interval can be stated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from xray_tf.config import ConfigError

RESAMPLES = 2000  # enough for the 2.5 % and 97.5 % percentiles to be stable to a few tenths of a percent
CONFIDENCE = 0.95
_BLOCK_ELEMENTS = 2**21  # weights per block: 16 MB of float64, whatever the split's size

# A statistic maps a block of per-image weights [resamples, images] to name -> value per resample
# (NaN where undefined in that resample).
Statistic = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def resample_weights(labels: Sequence[int], groups: Sequence[object] | None = None, resamples: int = RESAMPLES,
                     seed: int = 0) -> Iterator[np.ndarray]:
    """Blocks of per-image weights ``[r, n]``, ``resamples`` rows in all, stratified by class over groups.

    ``labels`` holds each image's class, ``groups`` its patient id (None: each image its own group).
    In each stratum as many groups are drawn, with replacement, as the stratum holds; an image's
    weight is the number of times its group was drawn.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"Expected one label per image, got an array of shape {labels.shape}.")
    if resamples < 1:
        raise ConfigError("resamples", resamples, "must be positive.")
    image_group, group_stratum = _strata(labels, groups)
    members = [np.flatnonzero(group_stratum == s) for s in np.unique(group_stratum)]
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // max(1, len(labels)))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        group_counts = np.zeros((rows, len(group_stratum)), dtype=np.float64)
        for stratum in members:
            draws = rng.integers(0, len(stratum), size=(rows, len(stratum)))
            flat = (draws + len(stratum) * np.arange(rows)[:, None]).ravel()  # one bincount for every row
            group_counts[:, stratum] = np.bincount(flat, minlength=rows * len(stratum)).reshape(rows, len(stratum))
        yield group_counts[:, image_group]


def _strata(labels: np.ndarray, groups: Sequence[object] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(group index of each image, stratum of each group)``; a group's stratum is its majority class."""
    _, label_index = np.unique(labels, return_inverse=True)
    if groups is None:
        return np.arange(len(labels)), label_index
    groups = list(groups)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} patient groups for {len(labels)} images.")
    if any(g is None or (isinstance(g, float) and math.isnan(g)) for g in groups):
        raise ValueError("A patient group is missing (None or NaN); give an image without a patient id a group "
                         "of its own.")
    _, image_group = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    num_groups, num_classes = image_group.max(initial=-1) + 1, label_index.max(initial=-1) + 1
    counts = np.bincount(image_group * num_classes + label_index, minlength=num_groups * num_classes)
    return image_group, counts.reshape(num_groups, num_classes).argmax(axis=1)  # argmax: ties to the lowest class


def bootstrap(statistic: Statistic, labels: Sequence[int], groups: Sequence[object] | None = None,
              resamples: int = RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """``name -> [resamples]`` values of ``statistic`` over stratified (and grouped) bootstrap resamples."""
    blocks = [statistic(weights) for weights in resample_weights(labels, groups, resamples, seed)]
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


def paired_differences(statistic_a: Statistic, statistic_b: Statistic, labels: Sequence[int],
                       groups: Sequence[object] | None = None, resamples: int = RESAMPLES,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """``name -> [resamples]`` of A's value minus B's, both measured on the same resample of the same images.

    Pairing removes the variation the two share (an image hard for both), so the interval of the
    difference is narrower than one built from the two intervals.
    """
    def difference(weights: np.ndarray) -> dict[str, np.ndarray]:
        a, b = statistic_a(weights), statistic_b(weights)
        return {name: a[name] - b[name] for name in a}

    return bootstrap(difference, labels, groups, resamples, seed)


def percentile_interval(values: np.ndarray, point: float | None,
                        confidence: float = CONFIDENCE) -> list[float] | None:
    """``[low, high]``: the central ``confidence`` share of the resampled ``values``, or None by the rule above."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be strictly between 0 and 1.")
    values = np.asarray(values, dtype=np.float64)
    if point is None or not math.isfinite(point) or len(values) == 0:
        return None
    defined = values[np.isfinite(values)]
    tail = (1.0 - confidence) / 2.0
    if len(values) - len(defined) > tail * len(values):
        return None
    low, high = np.percentile(defined, [100.0 * tail, 100.0 * (1.0 - tail)])
    return [float(low), float(high)]


def intervals(resampled: Mapping[str, np.ndarray], points: Mapping[str, float | None],
              confidence: float = CONFIDENCE) -> dict[str, list[float] | None]:
    """``name -> [low, high] or None`` for every resampled metric, beside its point estimate."""
    return {name: percentile_interval(values, points[name], confidence) for name, values in resampled.items()}


def defined(value: float) -> float | None:
    """A metric as JSON gives it: NaN (undefined) becomes None, which is written as null."""
    return None if math.isnan(value) else float(value)


def mcnemar_p_value(only_a_correct: int, only_b_correct: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs: images only A, or only B, got right.

    Under "A and B are equally accurate" each discordant image is a fair coin, so the p-value is
    twice the binomial tail of the smaller count (capped at 1); without discordant images it is 1.
    Images are taken as independent: the test does not know about patients. A p-value below the
    smallest float (about 1e-308, e.g. 0 against 1100) reads 0.
    """
    if only_a_correct < 0 or only_b_correct < 0:
        raise ValueError(f"Discordant counts must be non-negative, got {only_a_correct} and {only_b_correct}.")
    discordant = only_a_correct + only_b_correct
    tail = sum(math.comb(discordant, i) for i in range(min(only_a_correct, only_b_correct) + 1))
    return min(1.0, 2 * tail / 2**discordant)  # exact integers until the one division
