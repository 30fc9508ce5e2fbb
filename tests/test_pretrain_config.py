"""The pretraining settings: checks naming the field, the flagfile round trip, the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest

from xray_tf.config import ConfigError
from xray_tf.pretrain_config import PretrainConfig


@pytest.mark.parametrize(("changes", "field"), [
    ({"images": ()}, "images"),
    ({"images": ("/no/such/folder",)}, "images"),
    ({"batch_size": 1}, "batch_size"),
    ({"method": "simclr"}, "method"),
    ({"model": "densenet_chexnet"}, "model"),
    ({"image_size": 16}, "image_size"),
    ({"cache": "none"}, "cache"),
    ({"blur_prob": 1.5}, "blur_prob"),
    ({"crop_scale_min": 0.0}, "crop_scale_min"),
    ({"warmup_epochs": 5, "epochs": 5}, "warmup_epochs"),
    ({"weights": "/no/such.weights.h5"}, "weights"),
    ({"resume": True}, "run_name"),
    ({"run_name": "../elsewhere"}, "run_name"),
    ({"learning_rate": math.nan}, "learning_rate"),
])
def test_a_setting_that_cannot_work_is_refused_by_name(tmp_path, changes, field):
    config = dataclasses.replace(PretrainConfig(images=(str(tmp_path),), output_dir=str(tmp_path)), **changes)
    with pytest.raises(ConfigError) as refusal:
        config.validate()
    assert refusal.value.field == field


def test_the_flagfile_gives_back_the_same_settings(tmp_path):
    config = PretrainConfig(images=(str(tmp_path), str(tmp_path / "b.csv")), method="simsiam", epochs=7,
                            learning_rate=3e-4, run_name="mine")
    path = tmp_path / "flags.txt"
    path.write_text(config.to_flagfile())
    assert PretrainConfig.from_flagfile(str(path)) == config
    assert config.changed_settings(dataclasses.replace(config, output_dir="other", resume=True)) == {}
    assert config.changed_settings(dataclasses.replace(config, epochs=8)) == {"epochs": (7, 8)}


def test_the_schedule_warms_up_then_follows_half_a_cosine_or_stays():
    config = PretrainConfig(images=("x",), epochs=5, warmup_epochs=1, learning_rate=1.0)
    assert [config.learning_rate_at(epoch) for epoch in range(5)] == pytest.approx(
        [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    constant = dataclasses.replace(config, schedule="constant", warmup_epochs=0)
    assert [constant.learning_rate_at(epoch) for epoch in range(5)] == [1.0] * 5
