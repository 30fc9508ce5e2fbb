"""TrainConfig: validation names the field, flagfiles round-trip, includes resolve beside their file."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from xray_tf import config
from xray_tf.config import ConfigError, TrainConfig


def test_config_module_imports_nothing_heavy():
    probe = "import sys, xray_tf.config; print(sorted(m for m in ('tensorflow', 'keras', 'pandas', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("field, value, words", [
    ("batch_size", 0, "must be positive"),
    ("model", "vgg", "not one of resnet50"),
    ("image_size", 16, "below 32"),
    ("rotation_degrees", float("nan"), "finite"),
    ("val_fraction", 1.0, "strictly between 0 and 1"),
    ("export", "saved_model,bogus", "'bogus': no export format; choose from saved_model, onnx, litert"),
])
def test_validate_names_the_field(tmp_path, field, value, words):
    bad = dataclasses.replace(TrainConfig(weights="none", output_dir=str(tmp_path)), **{field: value})
    with pytest.raises(ConfigError) as caught:
        bad.validate()
    assert caught.value.field == field and words in str(caught.value)
    assert caught.value.as_flag().startswith(f"--{field}=")


def test_flagfile_round_trip(tmp_path):
    original = TrainConfig(data_dir=str(tmp_path), model="densenet121", epochs=3, learning_rate=2.5e-4,
                           scale_lr_with_batch=True, run_name="x")
    path = tmp_path / "flags.txt"
    path.write_text(original.to_flagfile())
    assert TrainConfig.from_flagfile(str(path)) == original
    assert original.changed_settings(dataclasses.replace(original, run_name="y", output_dir="elsewhere")) == {}
    assert original.changed_settings(dataclasses.replace(original, seed=5)) == {"seed": (0, 5)}
    # The exports are made once training ends: a resumed run may ask for others.
    assert original.changed_settings(dataclasses.replace(original, export="onnx,litert")) == {}


def test_data_dir_is_given_once_per_folder(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    config = TrainConfig.from_args([f"--data_dir={tmp_path / 'a'}", "--epochs=2", f"--data_dir={tmp_path / 'b'}"])
    assert config.data_dir == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert config.to_flagfile().count("--data_dir=") == 2
    assert TrainConfig(data_dir=tmp_path / "a").data_dir == (str(tmp_path / "a"),)  # one folder, a str or a path
    with pytest.raises(ConfigError, match="data_dir=.*missing.*not a directory"):
        TrainConfig(data_dir=[str(tmp_path / "a"), str(tmp_path / "missing")], weights="none").validate()


@pytest.mark.parametrize("spec, words", [("Normal,,Virus", "'' is no class"), ("a=", "'a=' is no class"),
                                         ("a=x,a=y", "label 'a' is named twice")])
def test_class_names_that_cannot_work_are_refused(spec, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(class_names=spec, weights="none").validate()
    assert config.class_name_map("NORMAL=Normal, b=Pneumonia,v=Pneumonia") == {
        "NORMAL": "Normal", "b": "Pneumonia", "v": "Pneumonia"}


def test_unknown_or_mistyped_settings_are_refused(tmp_path):
    path = tmp_path / "flags.txt"
    path.write_text("--epochs=3\n--no_such_setting=1\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        TrainConfig.from_flagfile(str(path))
    with pytest.raises(ConfigError, match="epochs='three': expected an int"):
        TrainConfig.from_args(["--epochs=three"])


def test_includes_resolve_relative_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "common.cfg").write_text("# shared settings\n--epochs=7\n--image_size=64\n")
    (tmp_path / "shared" / "exp.cfg").write_text("--flagfile=common.cfg\n--image_size=96\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = config.expand_flagfiles([f"--flagfile={tmp_path / 'shared' / 'exp.cfg'}", "--seed=2", "--", "--epochs=1"])
    assert args == ["--epochs=7", "--image_size=64", "--image_size=96", "--seed=2", "--", "--epochs=1"]
    with pytest.raises(ConfigError, match="flagfile='missing.cfg': cannot be read"):
        config.expand_flagfiles(["--flagfile=missing.cfg"])


@pytest.mark.parametrize("name", config.EXPERIMENTS)
def test_every_experiment_flagfile_is_installed_and_valid(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the includes do not depend on the working directory
    settings = TrainConfig.from_args([f"--experiment={name}"])
    assert os.path.isfile(config.experiment_flagfile(name))
    assert settings.run_name == name
    if name != "demo":
        assert (settings.image_size, settings.batch_size, settings.epochs) == (224, 32, 20)  # common_paper.cfg


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ConfigError, match="not one of prce, prcw"):
        config.experiment_flagfile("nope")
