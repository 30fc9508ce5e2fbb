"""The training levers in one run: each does what it claims (issue 22).

The run is conftest's ``lever_run`` (shared with test_api): three epochs with the levers on and a
callback that records the weights at each epoch's end and those that validation used. The
schedules, the optimisers, the loss, the epoch metrics, early stopping and augmentation are tested
on their own in test_optimizers, test_losses, test_metrics, test_callbacks and test_augment; that a
resumed run with every lever on ends as the uninterrupted one, in test_training.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from keras import ops

from xray_tf import models, optimizers, rundir


def test_a_frozen_backbone_is_left_unchanged_and_then_trains(lever_run):
    before, after_first, after_second, _ = lever_run["recorder"].backbone
    for initial, frozen in zip(before, after_first):  # weights and BatchNorm statistics
        np.testing.assert_array_equal(initial, frozen)
    assert any(not np.array_equal(frozen, trained) for frozen, trained in zip(after_first, after_second))


def test_the_schedule_sets_each_epochs_rate(lever_run):
    expected = [optimizers.learning_rate_at(epoch, lever_run["config"]) for epoch in range(3)]
    assert lever_run["result"].history["learning_rate"].tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(0.005) and expected[1] == pytest.approx(0.01)


def test_the_kept_epoch_is_the_best_by_the_chosen_metric(lever_run):
    history, selection = lever_run["result"].history, lever_run["result"].metrics["model_selection"]
    for column in ("val_balanced_accuracy", "val_macro_f1", "val_macro_auc", "balanced_accuracy"):
        assert column in history.columns
    best = int(np.argmax(history["val_macro_f1"].to_numpy())) + 1  # the first of equals
    assert selection["monitor"] == "val_macro_f1" and selection["best_epoch"] == best
    assert selection["best_value"] == pytest.approx(history["val_macro_f1"].iloc[best - 1])
    assert selection["weight_averages"] is True


def test_validation_and_the_kept_model_use_the_weight_averages(lever_run):
    recorder, run_dir = lever_run["recorder"], lever_run["result"].run_dir
    best = lever_run["result"].metrics["model_selection"]["best_epoch"]
    kept = models.load_model(os.path.join(run_dir, rundir.MODEL), compile=False)
    kept_weights = [ops.convert_to_numpy(w) for w in kept.weights]
    assert len(kept_weights) == len(recorder.validated[best - 1])
    for validated, saved in zip(recorder.validated[best - 1], kept_weights):
        np.testing.assert_allclose(saved, validated, rtol=0, atol=1e-7)
    # The averages are not the weights that trained.
    assert any(not np.allclose(trained, saved) for trained, saved in zip(recorder.trained[best - 1], kept_weights))
