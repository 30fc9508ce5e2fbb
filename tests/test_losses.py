"""Focal loss, label smoothing, class weights and --focal_alpha parsing (the schedules: test_optimizers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from keras import ops

from xray_tf import losses
from xray_tf.config import ConfigError


def focal_by_hand(y_true, y_pred, alpha, gamma):
    """Mean over examples of -alpha_t (1 - p_t)^gamma log p_t, written out per example."""
    values = []
    for truth, probs in zip(y_true, y_pred):
        t = int(np.argmax(truth))
        alpha_t = alpha[t] if isinstance(alpha, list) else alpha
        values.append(-alpha_t * (1 - probs[t]) ** gamma * math.log(probs[t]))
    return sum(values) / len(values)


Y_TRUE = np.eye(4, dtype="float32")[[0, 1, 3, 2]]
Y_PRED = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.1, 0.1, 0.1, 0.7]], "float32")


@pytest.mark.parametrize("alpha_flag, alpha", [("0.25", 0.25), ("0.1,0.2,0.3,0.4", [0.1, 0.2, 0.3, 0.4])])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_loss_matches_the_formula(alpha_flag, alpha, gamma):
    loss = losses.build_loss("focal", [10, 20, 30, 40], focal_gamma=gamma, focal_alpha=alpha_flag)
    value = float(ops.convert_to_numpy(loss(Y_TRUE, Y_PRED)))
    assert value == pytest.approx(focal_by_hand(Y_TRUE, Y_PRED, alpha, gamma), rel=1e-5)


def test_cross_entropy_is_plain_categorical_cross_entropy():
    value = float(ops.convert_to_numpy(losses.build_loss("ce", [1, 1, 1, 1])(Y_TRUE, Y_PRED)))
    assert value == pytest.approx(-np.mean(np.log([0.7, 0.5, 0.1, 0.1])), rel=1e-5)


def test_balanced_weights_are_inverse_frequency():
    assert losses.balanced_weights([10, 30, 60]) == pytest.approx([100 / 30, 100 / 90, 100 / 180])
    assert losses.balanced_weights([5, 5]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="every class needs examples"):
        losses.balanced_weights([3, 0])


def test_focal_alpha_flag_parsing():
    assert losses.parse_focal_alpha("0.5", [1, 3]) == 0.5
    assert losses.parse_focal_alpha("balanced", [1, 3]) == pytest.approx([2.0, 2 / 3])
    for bad, message in [("x", "expected a number"), ("0.1,0.2,0.3", "3 values for 2 classes"), ("-1", "positive")]:
        with pytest.raises(ValueError, match=message):
            losses.parse_focal_alpha(bad, [1, 3])


def test_unknown_loss_names_the_flag():
    with pytest.raises(ConfigError, match="^loss='hinge': not one of"):
        losses.build_loss("hinge", [1, 1])


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_label_smoothing_costs_a_confident_correct_prediction_what_the_smoothed_targets_say(name):
    """With s = 0.1 and 4 classes the targets are 0.925 and 0.025: a prediction of 0.97 / 0.01 then costs
    -sum(t log p) (focal: each term weighted by alpha (1 - p)^gamma) instead of -log 0.97."""
    y_true = np.array([[1.0, 0.0, 0.0, 0.0]])
    y_pred = np.array([[0.97, 0.01, 0.01, 0.01]])
    plain = float(losses.build_loss(name, [1, 1, 1, 1], focal_gamma=2.0, focal_alpha="0.25")(y_true, y_pred))
    smoothed = float(losses.build_loss(name, [1, 1, 1, 1], focal_gamma=2.0, focal_alpha="0.25",
                                       label_smoothing=0.1)(y_true, y_pred))
    targets = 0.9 * y_true + 0.1 / 4
    weights = 0.25 * (1 - y_pred) ** 2 if name == "focal" else np.ones_like(y_pred)
    assert plain == pytest.approx(float(-(weights * y_true * np.log(y_pred)).sum()), rel=1e-5)
    assert smoothed == pytest.approx(float(-(weights * targets * np.log(y_pred)).sum()), rel=1e-5)
    assert smoothed > plain
