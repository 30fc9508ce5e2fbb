"""The learning-rate schedules and the optimisers: backbone rate, weight averages, saving."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from keras import ops

from xray_tf import models, optimizers
from xray_tf.config import ConfigError, TrainConfig


def test_step_decay_halves_every_ten_epochs():
    config = TrainConfig()
    rates = {epoch: optimizers.learning_rate_at(epoch, config) for epoch in (0, 9, 10, 19, 20)}
    assert rates[0] == rates[9] == pytest.approx(1e-3)
    assert rates[10] == rates[19] == pytest.approx(5e-4)
    assert rates[20] == pytest.approx(2.5e-4)


def test_cosine_falls_from_the_rate_to_near_zero_after_a_linear_warmup():
    config = TrainConfig(schedule="cosine", epochs=21, warmup_epochs=1, learning_rate=0.1)
    rates = [optimizers.learning_rate_at(epoch, config) for epoch in range(21)]
    assert rates[0] == pytest.approx(0.05)  # warmup: half-way up
    assert rates[1] == pytest.approx(0.1)  # the schedule's first epoch: the full rate
    assert rates[11] == pytest.approx(0.05)  # half-way through the 20 cosine epochs
    assert rates[20] == pytest.approx(0.05 * (1 + math.cos(math.pi * 19 / 20)))  # the last epoch still learns
    assert all(later < earlier for earlier, later in zip(rates[1:], rates[2:]))


def test_warmup_leads_into_step_decay_counted_from_its_end():
    config = TrainConfig(warmup_epochs=3, lr_decay_epochs=2)
    rates = [optimizers.learning_rate_at(epoch, config, initial_rate=1.0) for epoch in range(7)]
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.5])


def test_scheduler_sets_the_optimizer_rate():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(float(ops.convert_to_numpy(model.optimizer.learning_rate))))
    config = TrainConfig(lr_decay_epochs=2)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: optimizers.learning_rate_at(epoch, config))
    model.fit(np.ones((4, 1)), np.ones((4, 1)), epochs=5, verbose=0, callbacks=[schedule, record])
    assert seen == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("settings, kind", [
    ({}, keras.optimizers.Adam),
    ({"optimizer": "adamw", "weight_decay": 0.01}, optimizers.AdamW),
    ({"optimizer": "sgd", "momentum": 0.8}, optimizers.SGD),
    ({"backbone_lr_multiplier": 0.1}, optimizers.Adam),
])
def test_each_setting_gets_its_optimizer(settings, kind):
    optimizer = optimizers.build_optimizer(TrainConfig(**settings), 0.01)
    assert type(optimizer) is kind
    config = optimizer.get_config()
    assert config["learning_rate"] == pytest.approx(0.01)
    assert config["weight_decay"] == settings.get("weight_decay")
    if "momentum" in settings:
        assert config["momentum"] == pytest.approx(0.8)


def test_adamw_without_weight_decay_is_refused():
    with pytest.raises(ConfigError, match="weight_decay=0.0: --optimizer=adamw needs a positive"):
        TrainConfig(optimizer="adamw").validate()


def _data(count: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (count, 32, 32, 1), dtype=np.uint8),
            keras.utils.to_categorical(np.arange(count) % 3, 3))


def _tiny_classifier() -> keras.Model:
    """A convolution for a backbone and a head named as build_model names it: milliseconds to build."""
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(ops.cast(inputs, "float32") / 255.0)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probabilities")(x))


def _trained(config: TrainConfig, epochs: int = 1) -> tuple[keras.Model, list[np.ndarray]]:
    """A tiny classifier fitted with ``config``'s optimiser; the weights before fitting."""
    keras.utils.set_random_seed(0)
    model = _tiny_classifier()
    model.compile(optimizer=optimizers.build_optimizer(config, 0.01), loss="categorical_crossentropy")
    before = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    model.fit(*_data(), batch_size=4, epochs=epochs, verbose=0)
    return model, before


def _moved(model: keras.Model, before: list[np.ndarray]) -> tuple[float, float]:
    """The largest change of a backbone weight and of a head weight."""
    changes = [float(np.abs(ops.convert_to_numpy(v) - b).max()) for v, b in zip(model.trainable_variables, before)]
    head = [path.startswith("probabilities/") for path in (v.path for v in model.trainable_variables)]
    return (max(c for c, h in zip(changes, head) if not h), max(c for c, h in zip(changes, head) if h))


def test_the_backbone_learns_at_its_multiple_of_the_rate():
    """SGD without momentum: an update is rate x gradient, so a multiplier 0 holds the backbone still and
    the head moves as it does at multiplier 1 on the first step."""
    still, _ = _moved(*_trained(TrainConfig(optimizer="sgd", momentum=0.0, backbone_lr_multiplier=0.0)))
    moving, _ = _moved(*_trained(TrainConfig(optimizer="sgd", momentum=0.0)))
    assert still == 0.0 and moving > 0.0
    # Adam's update does not scale with the gradient: the multiplier must scale the update itself.
    adam_still, adam_head = _moved(*_trained(TrainConfig(backbone_lr_multiplier=0.0)))
    assert adam_still == 0.0 and adam_head > 0.0


def test_the_average_stays_aside_until_the_kept_model_takes_it(tmp_path):
    model, _ = _trained(TrainConfig(ema_decay=0.5), epochs=2)
    trained = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    # Keras would have put the averages into the weights when fit ended; here they are still the trained ones.
    averages = [ops.convert_to_numpy(v) for v in model.optimizer.variables if "average" in v.path]
    assert len(averages) == len(trained)
    assert any(not np.allclose(a, t) for a, t in zip(averages, trained))
    assert optimizers.use_weight_averages(model)
    for variable, average in zip(model.trainable_variables, averages):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), average)
    # The optimiser, its settings and its state survive saving.
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = models.load_model(path)
    assert type(loaded.optimizer) is optimizers.Adam
    assert loaded.optimizer.get_config()["ema_momentum"] == pytest.approx(0.5)


def test_without_an_average_the_weights_are_left_alone():
    model, _ = _trained(TrainConfig(), epochs=1)
    assert not optimizers.use_weight_averages(model)
