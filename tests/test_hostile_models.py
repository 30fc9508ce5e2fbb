"""Model files that are broken or hostile: refused by name in one line, with no traceback and nothing written.

The ``.keras`` cases go through ``models.load_model`` (what xray-evaluate, xray-predict and the report
load with), the ``.pth`` cases through ``chexnet.convert_checkpoint`` (xray-convert-chexnet); each runs
inside ``cli.reports_errors``, as the commands do, so the test sees what the user would read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import warnings
import zipfile

import keras
import numpy as np
import pytest

from xray_tf import chexnet, cli, models


def refusal(program: str, call, capfd) -> str:
    """The one-line error ``call()`` ends ``program`` with (exit status 1), checked to come alone: no traceback
    and no warning printed on the way."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exited:
        cli.reports_errors(program)(lambda argv: call())([program])
    assert not caught, [str(warning.message) for warning in caught]
    message = exited.value.code
    assert isinstance(message, str), message  # sys.exit(text): status 1, the text on standard error
    assert message.startswith(f"{program}: error: ") and "\n" not in message, message
    assert "Traceback" not in capfd.readouterr().err
    return message


# --- .keras -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_keras(tmp_path_factory) -> str:
    """A tiny model of xray_tf's layers, saved as training saves one."""
    inputs = keras.Input((8, 8, None), dtype="uint8", name="image")
    x = models.XrayPreprocessing("torch", name="preprocessing")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(x)
    path = str(tmp_path_factory.mktemp("good") / "model.keras")
    keras.Model(inputs, outputs).save(path)
    return path


def _rewritten(source: str, target: str, edit_config=None, replace: dict | None = None) -> None:
    """``source``'s archive written to ``target`` with its config edited or members replaced."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            content = (replace or {}).get(name, original.read(name))
            if name == "config.json" and edit_config:
                config = json.loads(content)
                edit_config(config["config"]["layers"])
                content = json.dumps(config).encode()
            copy.writestr(name, content)


def _unknown_class(layers):
    layers[1].update(module="evil_module", class_name="Evil", registered_name="evil>Evil")


def _os_function(layers):
    layers[1].update(module="os", class_name="system", registered_name=None)


def _more_units(layers):
    layers[-1]["config"]["units"] = 3


def _write_keras_case(case: str, good: str, path: str) -> None:
    if case == "empty":
        open(path, "wb").close()
    elif case == "not_a_zip":
        with open(path, "w") as handle:
            handle.write("<html>404 Not Found</html>")
    elif case == "truncated":
        with open(good, "rb") as handle:
            content = handle.read()
        with open(path, "wb") as handle:
            handle.write(content[: len(content) // 2])
    elif case == "foreign_weights":
        _rewritten(good, path, replace={"model.weights.h5": b"not HDF5"})
    else:
        _rewritten(good, path, {"unknown_class": _unknown_class, "os_function": _os_function,
                                "wrong_shape": _more_units}[case])


@pytest.mark.parametrize("case, reason", [
    ("empty", "an empty file"),
    ("not_a_zip", "not a zip archive"),
    ("truncated", "not a zip archive"),
    ("foreign_weights", "file signature not found"),
    ("unknown_class", "Could not locate class 'Evil'"),
    ("os_function", "Could not locate class 'system'"),
    ("wrong_shape", "value.shape=(3, 2)"),
])
def test_a_broken_keras_file_is_refused_by_name(case, reason, good_keras, tmp_path, capfd):
    path = str(tmp_path / "model.keras")
    _write_keras_case(case, good_keras, path)
    message = refusal("xray-evaluate", lambda: models.load_model(path), capfd)
    assert message.startswith(f"xray-evaluate: error: {path}: ") and reason in message, message
    assert len(message) < 600 and "{" not in message  # Keras' config dumps are left out
    assert os.listdir(tmp_path) == ["model.keras"]


def test_a_lambda_layer_is_refused_without_running_it(tmp_path, capfd):
    marker = str(tmp_path / "code_was_executed")
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2 + (os.mkdir(marker) or 0))(inputs)  # runs on a call
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, outputs).save(path)
    if os.path.exists(marker):
        os.rmdir(marker)  # building the model traced the function once
    message = refusal("xray-predict", lambda: models.load_model(path, compile=False), capfd)
    assert message.startswith(f"xray-predict: error: {path}: ") and "`Lambda` layer" in message
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name, reason", [("missing.keras", "no such file"), ("folder.keras", "a folder"),
                                          ("model.h5", "must end in .keras")])
def test_a_path_that_is_no_keras_file_is_refused_by_name(name, reason, good_keras, tmp_path, capfd):
    os.mkdir(tmp_path / "folder.keras")
    if name == "model.h5":
        shutil.copy(good_keras, tmp_path / name)  # a real .keras archive, misnamed: Keras would pick its legacy loader
    path = str(tmp_path / name)
    message = refusal("xray-evaluate", lambda: models.load_model(path), capfd)
    assert message.startswith(f"xray-evaluate: error: {path}: ") and reason in message


def test_the_good_file_loads_compiled_or_not(good_keras):
    images = np.zeros((1, 8, 8, 1), np.uint8)
    for compile in (True, False):
        model = models.load_model(good_keras, compile=compile)
        assert model.predict_on_batch(images).shape == (1, 2)


# --- .pth (xray-convert-chexnet) ------------------------------------------------------------------

CONVERTER = "xray-convert-chexnet"


def _convert(tmp_path, source: str, capfd, allow_pickle: bool = False) -> str:
    """The converter's refusal of ``source``, checked to have written nothing beside it."""
    before = sorted(os.listdir(tmp_path))
    output = str(tmp_path / "chexnet.weights.h5")
    message = refusal(CONVERTER, lambda: chexnet.convert_checkpoint(source, output, allow_pickle), capfd)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary
    return message


def test_a_missing_or_empty_checkpoint_is_refused_before_torch_is_needed(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as without PyTorch installed
    missing = str(tmp_path / "model.pth.tar")
    assert _convert(tmp_path, missing, capfd).startswith(f"{CONVERTER}: error: {missing}: no such file")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert _convert(tmp_path, str(empty), capfd).startswith(f"{CONVERTER}: error: {empty}: the file is empty")
    text = tmp_path / "model.pth"
    text.write_text("not a checkpoint")
    assert _convert(tmp_path, str(text), capfd).startswith(f"{CONVERTER}: error: {text}: not a readable PyTorch")
    old_tar = str(tmp_path / "old.pth.tar")  # PyTorch < 0.1.10's format: only full unpickling reads it
    with tarfile.open(old_tar, "w") as archive:
        archive.add(text, arcname="tensors")
    message = _convert(tmp_path, old_tar, capfd, allow_pickle=True)
    assert message.startswith(f"{CONVERTER}: error: {old_tar}: it is in the .tar format of PyTorch before 0.1.10")
    assert "PyTorch is not installed" in message and "pip install torch" in message


def _torch_cases(torch, tmp_path) -> dict[str, str]:
    """Files that are not checkpoints torch's safe loader reads, by name."""
    good = str(tmp_path / "small.pth")
    torch.save({"state_dict": {"features.conv0.weight": torch.zeros(2)}}, good)
    with open(good, "rb") as handle:
        content = handle.read()
    files = {"text.pth": b"<html>404 Not Found</html>", "random.pth": bytes(range(256)) * 8,
             "truncated.pth": content[: len(content) // 2]}
    for name, data in files.items():
        with open(tmp_path / name, "wb") as handle:
            handle.write(data)
    with zipfile.ZipFile(tmp_path / "other_zip.pth", "w") as archive:
        archive.writestr("readme.txt", "a zip, but no PyTorch archive")
    with tarfile.open(tmp_path / "old_tar.pth.tar", "w") as archive:  # PyTorch < 0.1.10 wrote tar archives
        archive.add(good, arcname="tensors")
    torch.save([torch.zeros(2)], tmp_path / "a_list.pth")
    return {name: str(tmp_path / name) for name in [*files, "other_zip.pth", "old_tar.pth.tar", "a_list.pth"]}


def test_a_file_torch_cannot_read_safely_is_refused_by_name(tmp_path, capfd):
    torch = pytest.importorskip("torch", reason="PyTorch (the `convert` extra) writes the checkpoints")
    expected = {"text.pth": "not a readable PyTorch checkpoint", "random.pth": "not a readable PyTorch checkpoint",
                "truncated.pth": "not a readable PyTorch checkpoint", "other_zip.pth": "not a readable PyTorch",
                "old_tar.pth.tar": "the .tar format of PyTorch before 0.1.10", "a_list.pth": "got list"}
    for name, path in _torch_cases(torch, tmp_path).items():
        message = _convert(tmp_path, path, capfd)
        assert message.startswith(f"{CONVERTER}: error: {path}: ") and expected[name] in message, message
        assert len(message) < 400, message
    assert "--allow_pickle" in _convert(tmp_path, str(tmp_path / "old_tar.pth.tar"), capfd)


class _RunsCodeWhenUnpickled:
    """Stands for arbitrary pickled code: unpickling it creates a directory."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_that_needs_full_unpickling_is_refused_without_running_it(tmp_path, capfd):
    torch = pytest.importorskip("torch", reason="PyTorch (the `convert` extra) writes the checkpoints")
    marker = str(tmp_path.parent / f"{tmp_path.name}_code_was_executed")
    source = str(tmp_path / "model.pth.tar")
    torch.save({"state_dict": {"features.conv0.weight": torch.zeros(2)}, "args": _RunsCodeWhenUnpickled(marker)},
               source)
    message = _convert(tmp_path, source, capfd)
    assert message.startswith(f"{CONVERTER}: error: {source}: it names the Python object ")
    assert "mkdir" in message and "--allow_pickle" in message and "trust" in message
    assert not os.path.exists(marker)


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path, capfd):
    torch = pytest.importorskip("torch", reason="PyTorch (the `convert` extra) writes the checkpoints")
    source = str(tmp_path / "resnet.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, source)
    message = _convert(tmp_path, source, capfd)
    assert message.startswith(f"{CONVERTER}: error: {source}: none of its tensors (2) belongs to a DenseNet-121")
    assert "conv1.weight" in message and "nothing was converted" in message


@pytest.mark.parametrize("output, reason", [
    ("missing_folder/chexnet.weights.h5", "does not exist"),
    ("a_folder.weights.h5", "is a folder"),
    ("chexnet.h5", "must end in '.weights.h5'"),
])
def test_an_output_that_cannot_be_written_is_refused_before_reading(output, reason, tmp_path, capfd):
    os.mkdir(tmp_path / "a_folder.weights.h5")
    path = str(tmp_path / output)
    unread = str(tmp_path / "never_read.pth")  # missing: reading it would be a different refusal
    message = refusal(CONVERTER, lambda: chexnet.convert_checkpoint(unread, path), capfd)
    assert message.startswith(f"{CONVERTER}: error: --output={path}: ") and reason in message
    assert sorted(os.listdir(tmp_path)) == ["a_folder.weights.h5"] and not os.listdir(tmp_path / "a_folder.weights.h5")
