"""A run's optimiser and learning-rate schedule: the paper's Adam with step decay, and the alternatives.

The rate is set once per epoch (``keras.callbacks.LearningRateScheduler`` with ``learning_rate_at``),
so a resumed run recomputes it from the epoch alone. ``--backbone_lr_multiplier`` and
``--ema_decay`` need one thing Keras' optimisers lack, a rate per variable and weights averaged
only where this project says; ``_XrayOptimizer`` adds both to Adam, AdamW and SGD (a class each,
registered so that ``model.keras`` names them).
"""

from __future__ import annotations

import math

import keras

from xray_tf.config import TrainConfig

# The head's layers, named by models.build_model: they learn at the full rate.
HEAD_LAYERS = ("probabilities",)


def learning_rate_at(epoch: int, config: TrainConfig, initial_rate: float | None = None) -> float:
    """The rate of 0-based ``epoch``: a linear warmup, then step decay or half a cosine down to 0.

    Warmup epoch ``e`` gets ``(e + 1) / (warmup + 1)`` of the rate, so the first epoch already
    learns and the rate reaches ``initial_rate`` at the schedule's first epoch. ``initial_rate``
    defaults to ``config.learning_rate`` (training passes it scaled by the replica count).
    """
    rate = config.learning_rate if initial_rate is None else initial_rate
    warmup = config.warmup_epochs
    if epoch < warmup:
        return rate * (epoch + 1) / (warmup + 1)
    if config.schedule == "step":
        return rate * config.lr_decay ** ((epoch - warmup) // config.lr_decay_epochs)
    progress = (epoch - warmup) / (config.epochs - warmup)  # < 1 in the last epoch: it still learns
    return rate * 0.5 * (1.0 + math.cos(math.pi * progress))


class _XrayOptimizer:
    """Mixin for a Keras optimiser: the backbone's rate multiplied, and the weight average kept aside.

    ``backbone_rate`` multiplies the rate of every variable outside ``HEAD_LAYERS`` (the update
    itself, so it works for Adam, whose updates do not scale with the gradient); decoupled weight
    decay keeps the full rate. Keras replaces the weights by their average when ``fit`` ends;
    here they stay the trained ones, so a second ``fit`` (after ``--freeze_backbone_epochs``)
    continues from them as a resumed run does, and the kept model takes the average explicitly
    (``use_averages``).
    """

    def __init__(self, *args, backbone_rate: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_rate = backbone_rate
        self._rates: list[float] = []

    def build(self, variables):
        super().build(variables)
        self._rates = [1.0 if variable.path.split("/")[0] in HEAD_LAYERS else self.backbone_rate
                       for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        rate = self._rates[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate if rate == 1.0 else learning_rate * rate)

    def finalize_variable_values(self, var_list):
        """Leave the trained weights in place when ``fit`` ends (see the class docstring)."""

    def use_averages(self, var_list: list[keras.Variable]) -> None:
        """Replace ``var_list`` (the model's trainable variables) by their moving averages."""
        super().finalize_variable_values(var_list)

    def get_config(self):
        return {**super().get_config(), "backbone_rate": self.backbone_rate}


@keras.saving.register_keras_serializable(package="xray_tf")
class Adam(_XrayOptimizer, keras.optimizers.Adam):
    """Keras' Adam with a backbone rate and a weight average kept aside (see ``_XrayOptimizer``)."""


@keras.saving.register_keras_serializable(package="xray_tf")
class AdamW(_XrayOptimizer, keras.optimizers.AdamW):
    """Keras' AdamW with a backbone rate and a weight average kept aside (see ``_XrayOptimizer``)."""


@keras.saving.register_keras_serializable(package="xray_tf")
class SGD(_XrayOptimizer, keras.optimizers.SGD):
    """Keras' SGD with a backbone rate and a weight average kept aside (see ``_XrayOptimizer``)."""


def use_weight_averages(model: keras.Model) -> bool:
    """Give ``model`` its weights' moving averages if its optimiser kept them (``--ema_decay``); whether it did."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # inside a LossScaleOptimizer
    if not (isinstance(optimizer, _XrayOptimizer) and optimizer.use_ema):
        return False
    optimizer.use_averages(model.trainable_variables)
    return True


CUSTOM_OBJECTS = {f"xray_tf>{cls.__name__}": cls for cls in (Adam, AdamW, SGD)}


def build_optimizer(config: TrainConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    """The optimiser ``config`` names, starting at ``learning_rate``.

    The paper's settings (Adam, no backbone multiplier, no average) get Keras' own Adam, so its
    runs train and save exactly as they always did.
    """
    common = {"learning_rate": learning_rate, "weight_decay": config.weight_decay or None}
    if config.ema_decay:
        common.update(use_ema=True, ema_momentum=config.ema_decay)
    plain = config.backbone_lr_multiplier == 1.0 and not config.ema_decay
    if config.optimizer == "adam":
        return keras.optimizers.Adam(**common) if plain else Adam(backbone_rate=config.backbone_lr_multiplier, **common)
    if config.optimizer == "adamw":  # config.validate: weight_decay > 0
        return AdamW(backbone_rate=config.backbone_lr_multiplier, **common)
    return SGD(momentum=config.momentum, backbone_rate=config.backbone_lr_multiplier, **common)
