"""The PyTorch-free checkpoint reader: what torch.load(weights_only=True) reads, refusals by name, no PyTorch.

PyTorch itself writes the reference checkpoints (skipped without it); files that need no tensor are
written here with plain pickle, so that the refusals are tested on machines without PyTorch too.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import pytest

from xray_tf import torch_checkpoint
from xray_tf.torch_checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch/serialization.py


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch writes the reference checkpoints")


def _assert_same(ours, theirs, torch, where: str = "checkpoint") -> None:
    """``ours`` (NumPy) holds what ``theirs`` (torch.load's) does: containers of the same types and keys in the
    same order, equal plain values, and arrays with the bytes of the tensors (bfloat16 as float32, devices as
    their names)."""
    if torch.is_tensor(theirs):
        expected = (theirs.float() if theirs.dtype == torch.bfloat16 else theirs).detach().numpy()
        assert isinstance(ours, np.ndarray), where
        assert (ours.dtype, ours.shape) == (expected.dtype, expected.shape), where
        assert ours.tobytes() == np.ascontiguousarray(expected).tobytes(), where  # NaN payloads, signed zeros
    elif isinstance(theirs, torch.device):
        assert ours == str(theirs), where  # a device is kept as its name
    elif isinstance(theirs, Mapping):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for key in theirs:
            _assert_same(ours[key], theirs[key], torch, f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for index, (mine, other) in enumerate(zip(ours, theirs)):
            _assert_same(mine, other, torch, f"{where}[{index}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def _chexnet_style(torch) -> dict:
    """``model.pth.tar``'s layout (module.densenet121. keys, legacy names, metadata beside the state dict), with
    tensors that are views into one shared storage and every dtype the reader converts."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 7, 7, generator=generator)
    conv.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])  # bits, not just values
    packed = torch.randn(4, 16, generator=generator)  # one storage, viewed by four entries
    prefix = "module.densenet121.features."
    state_dict = OrderedDict([
        (f"{prefix}conv0.weight", conv),
        (f"{prefix}norm0.weight", packed[0]),
        (f"{prefix}norm0.bias", packed[1, ::2]),  # strided
        (f"{prefix}norm0.running_mean", packed[:, 5]),  # a column: stride 16, offset 5
        (f"{prefix}denseblock1.denselayer1.conv.2.weight", packed[2:].t()),  # transposed
        (f"{prefix}denseblock1.denselayer1.norm.1.running_var", torch.rand(5, dtype=torch.float64)),
        (f"{prefix}half", torch.randn(2, 3, generator=generator).half()),
        (f"{prefix}bfloat16", torch.randn(3, 2, generator=generator).bfloat16().t()),
        (f"{prefix}norm0.num_batches_tracked", torch.tensor(1234567890123)),
        (f"{prefix}bytes", torch.arange(250, 256, dtype=torch.uint8)),
        (f"{prefix}mask", torch.tensor([[True, False], [False, True]])),
        (f"{prefix}empty", torch.zeros(0, 3)),
    ])
    noted = torch.arange(3.0)
    noted.note = "a Python attribute"  # pickled through _rebuild_from_type_v2
    return {"epoch": 10, "arch": "densenet121", "best_loss": 0.15, "state_dict": state_dict,
            "history": [1.5, (2, "two")], "tag": b"\x00\xffbytes", "device": torch.device("cpu"),
            "parameter": torch.nn.Parameter(torch.ones(2, 2)), "noted": noted}


def test_a_chexnet_style_legacy_checkpoint_reads_as_torch_does(torch, tmp_path):
    path = str(tmp_path / "model.pth.tar")
    torch.save(_chexnet_style(torch), path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as handle:
        assert handle.read(2) == b"\x80\x02"  # the legacy stream of pickles, not a zip archive
    reference = torch.load(path, weights_only=True)
    shared = {tensor.untyped_storage().data_ptr() for key, tensor in reference["state_dict"].items()
              if re.search(r"norm0\.(weight|bias|running_mean)|conv\.2", key)}
    assert len(shared) == 1  # the views were saved as one storage, as they are meant to test
    _assert_same(load_checkpoint(path), reference, torch)


def _rewritten(source: str, target: str, prefix: str, byteorder: str | None) -> None:
    """``source``'s zip archive under another top folder, with another byteorder record or none."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            content, member = original.read(name), name.split("/", 1)[1]
            if member == "byteorder":
                continue
            if byteorder == "big" and member.startswith("data/"):
                content = np.frombuffer(content, "<u4").astype(">u4").tobytes()  # every tensor here has 4-byte items
            copy.writestr(f"{prefix}/{member}", content)
        if byteorder:
            copy.writestr(f"{prefix}/byteorder", byteorder)


@pytest.mark.parametrize("prefix, byteorder", [(None, "little"), ("archive", None), ("big_endian", "big")])
def test_a_torchvision_style_zip_checkpoint_reads_as_torch_does(prefix, byteorder, torch, tmp_path):
    torch.manual_seed(1)
    features = torch.nn.Sequential(OrderedDict(conv0=torch.nn.Conv2d(3, 4, 3), norm0=torch.nn.BatchNorm2d(4)))
    model = torch.nn.Sequential(OrderedDict(features=features, classifier=torch.nn.Linear(4, 10)))
    state_dict = model.state_dict()  # torchvision's files: a bare OrderedDict with _metadata
    if byteorder == "big":
        state_dict = OrderedDict((key, value.int() if key.endswith("tracked") else value)
                                 for key, value in state_dict.items())
    path = str(tmp_path / "densenet121-a639ec97.pth")
    torch.save(state_dict, path)
    if prefix:
        written, path = path, str(tmp_path / "rewritten.pth")
        _rewritten(written, path, prefix, byteorder)
    reference = torch.load(path, weights_only=True)
    _assert_same(load_checkpoint(path), reference, torch)
    _assert_same(load_checkpoint(path), state_dict, torch)  # byte-swapped back, where it was


class _Storage:
    """A storage of PyTorch < 1.0, which pickled views into a storage as a storage of their own."""

    def __init__(self, key: str, values: np.ndarray, view: tuple[str, int, int] | None = None):
        self.key, self.values, self.view = key, values, view


def _write_pre_1_0(torch, path: str, tensors: dict, storages: list[_Storage]) -> None:
    """The legacy stream as PyTorch 0.3 wrote it: _rebuild_tensor and ('storage', ..., view) persistent ids."""
    types = {np.float32: torch.FloatStorage, np.int64: torch.LongStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return "storage", types[obj.values.dtype.type], obj.key, "cpu", obj.values.size, obj.view
            return None

    class Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = storage, offset, size, stride

        def __reduce__(self):
            return torch._utils._rebuild_tensor, self.args

    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        Pickler(handle, protocol=2).dump({name: Tensor(*args) for name, args in tensors.items()})
        pickle.dump([storage.key for storage in storages], handle, protocol=2)
        for storage in storages:
            handle.write(np.int64(storage.values.size).tobytes() + storage.values.tobytes())


def test_pre_1_0_storage_views_read_as_torch_reads_them(torch, tmp_path):
    root = np.arange(24, dtype=np.float32) * 1.5
    whole, view = _Storage("root", root), _Storage("root", root, view=("view", 6, 12))  # elements 6..17
    counts = _Storage("counts", np.array([7, -8, 9], np.int64))
    tensors = {"whole": (whole, 0, (4, 6), (6, 1)), "in_view": (view, 2, (2, 3), (1, 2)),
               "column": (whole, 5, (3,), (7,)), "scalar": (counts, 1, (), ())}
    path = str(tmp_path / "old.pth")
    _write_pre_1_0(torch, path, tensors, [whole, counts])
    ours = load_checkpoint(path)
    _assert_same(ours, torch.load(path, weights_only=True), torch)
    np.testing.assert_array_equal(ours["in_view"], [[12, 15, 18], [13.5, 16.5, 19.5]])  # elements 8, 10, 12 / 9...


def test_a_tensor_reaching_outside_its_storage_is_refused(torch, tmp_path):
    storage = _Storage("root", np.zeros(6, np.float32))
    path = str(tmp_path / "outside.pth")
    _write_pre_1_0(torch, path, {"bad": (storage, 1, (2, 3), (3, 1))}, [storage])  # last element 1 + 3 + 2 = 6
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a valid PyTorch checkpoint: a tensor of "
                                                        "size (2, 3) reaches element 6 of storage root")):
        load_checkpoint(path)


class _Custom:
    """A class of this module: weights_only refuses its instances, as the reader must."""


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _Evaluates:
    def __reduce__(self):
        return eval, ("1 + 1",)


def _legacy_stream(path: str, obj) -> None:
    """A legacy checkpoint of plain objects, written without PyTorch."""
    with open(path, "wb") as handle:
        for item in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}, obj, []):
            pickle.dump(item, handle, protocol=2)


def test_a_pickled_object_is_refused_by_name_without_pytorch(tmp_path):
    path = str(tmp_path / "eval.pth")
    _legacy_stream(path, {"state_dict": {}, "args": _Evaluates()})
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{path}: it names the Python object builtins.eval")):
        load_checkpoint(path)


@pytest.mark.parametrize("name, attribute, value", [
    ("torch.FloatStorage", "name", "DoubleStorage"),
    ("torch._utils._rebuild_tensor_v2", "__defaults__", (1,)),
    ("torch.device", "function", "cpu"),
    ("collections.OrderedDict", "clear", None),
])
def test_a_pickle_cannot_change_what_the_reader_resolves(name, attribute, value, tmp_path):
    module, qualified = name.rsplit(".", 1)
    state = pickle.dumps((None, {attribute: value}), protocol=2)[2:-1]  # BUILD's "slot state": setattr
    obj = b"\x80\x02c" + f"{module}\n{qualified}\n".encode() + state + b"b."
    path = str(tmp_path / "build.pth")
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        handle.write(obj)
        pickle.dump([], handle, protocol=2)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ")) as refused:
        load_checkpoint(path)
    assert not isinstance(refused.value, UnsafeCheckpointError)
    resolved = torch_checkpoint._GLOBALS[name]
    assert getattr(resolved, attribute, None) != value and getattr(resolved, "name", "FloatStorage") == "FloatStorage"


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_a_pickled_object_is_refused_by_name_without_running_it(zip_format, torch, tmp_path):
    marker = str(tmp_path / "code_was_executed")
    for value, name in [(_RunsCodeWhenUnpickled(marker), f"{os.mkdir.__module__}.mkdir"),
                        (_Custom(), f"{_Custom.__module__}._Custom"),
                        (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear")]:
        path = str(tmp_path / "model.pth")
        torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": value}, path,
                   _use_new_zipfile_serialization=zip_format)
        with pytest.raises(UnsafeCheckpointError) as refused:
            load_checkpoint(path)
        assert str(refused.value) == f"{path}: it names the Python object {name}."
    assert not os.path.exists(marker)


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_a_truncated_checkpoint_is_refused_naming_the_path(zip_format, torch, tmp_path):
    source = str(tmp_path / "whole.pth")
    torch.save({"state_dict": {"a": torch.ones(300), "b": torch.zeros(2, dtype=torch.int64)}}, source,
               _use_new_zipfile_serialization=zip_format)
    with open(source, "rb") as handle:
        content = handle.read()
    path = str(tmp_path / "cut.pth")
    for end in sorted({1, 3, 20, 90, *range(0, len(content), len(content) // 40), len(content) - 1}):
        with open(path, "wb") as handle:
            handle.write(content[:end])
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: ") and not isinstance(refused.value, UnsafeCheckpointError), message
    if not zip_format:
        assert "truncated: storage" in message  # the last cut is inside the storages' bytes


@pytest.mark.parametrize("kind, reason", [("sparse", "does not rebuild (torch._utils._rebuild_sparse_tensor)"),
                                          ("expanded", "repeats the 1 elements of storage")])
def test_a_tensor_the_reader_does_not_rebuild_is_refused_as_unreadable_not_unsafe(kind, reason, torch, tmp_path):
    path = str(tmp_path / f"{kind}.pth")
    tensor = torch.eye(3).to_sparse() if kind == "sparse" else torch.ones(1).expand(10**12)  # 4 TB as a copy
    torch.save({"w": tensor}, path)
    with pytest.raises(CheckpointError, match=re.escape(reason)) as refused:
        load_checkpoint(path)
    assert not isinstance(refused.value, UnsafeCheckpointError)


def test_a_storage_larger_than_the_file_is_refused_before_reading(torch, tmp_path):
    path = str(tmp_path / "huge.pth")
    torch.save({"w": torch.ones(100)}, path, _use_new_zipfile_serialization=False)
    with open(path, "r+b") as handle:  # the one storage's element count, just before its 400 bytes
        handle.seek(-408, os.SEEK_END)
        assert int.from_bytes(handle.read(8), "little") == 100
        handle.seek(-408, os.SEEK_END)
        handle.write((2**60).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: truncated: storage")):
        load_checkpoint(path)


@pytest.mark.parametrize("name, content, reason", [
    ("text.pth", b"<html>404 Not Found</html>", "neither a zip archive nor PyTorch's legacy format"),
    ("random.pth", bytes(range(256)) * 8, "neither a zip archive nor PyTorch's legacy format"),
    ("plain.pkl", pickle.dumps({"w": [1.0, 2.0]}), "neither a zip archive nor PyTorch's legacy format"),
    ("array.npy", None, "neither a zip archive nor PyTorch's legacy format"),
    ("other.zip", None, "a zip archive with no PREFIX/data.pkl"),
])
def test_a_file_that_is_no_checkpoint_is_refused_naming_the_path(name, content, reason, tmp_path):
    path = str(tmp_path / name)
    if name == "array.npy":
        np.save(path, np.zeros(3))
    elif name == "other.zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "a zip, but no PyTorch archive")
    else:
        with open(path, "wb") as handle:
            handle.write(content)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {reason}")):
        load_checkpoint(path)


def _chexnet_state_dict(torch) -> OrderedDict:
    """A random CheXNet ``model.pth.tar`` state dict of the real size, shaped after the Keras model it becomes."""
    from xray_tf import chexnet

    generator, state_dict = torch.Generator().manual_seed(2), OrderedDict()
    for layer in chexnet._weighted_layers(chexnet.build_chexnet(32)):
        module = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])$", r"\1.\2", chexnet._torch_module(layer.name))
        for variable, parameter, axes in chexnet._parameter_targets(layer):
            shape = [variable.shape[axis] for axis in (np.argsort(axes) if axes else range(len(variable.shape)))]
            state_dict[f"module.densenet121.{module}.{parameter}"] = torch.rand(shape, generator=generator) + 0.5
    return state_dict


@pytest.mark.slow  # a process importing Keras and three DenseNet-121s built: about 17 s
def test_a_chexnet_checkpoint_converts_in_a_process_without_pytorch(torch, tmp_path):
    from xray_tf import chexnet

    source, output = str(tmp_path / "model.pth.tar"), str(tmp_path / "chexnet.weights.h5")
    torch.save({"epoch": 10, "state_dict": _chexnet_state_dict(torch)}, source, _use_new_zipfile_serialization=False)
    program = ("import sys; sys.modules['torch'] = None  # import torch fails, as without PyTorch\n"
               "from xray_tf import chexnet; chexnet.convert_checkpoint(sys.argv[1], sys.argv[2])\n")
    result = subprocess.run([sys.executable, "-c", program, source, output], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    # The reference: the same checkpoint read by torch.load(weights_only=True) in this process.
    state_dict = torch.load(source, weights_only=True)["state_dict"]
    reference = chexnet.build_chexnet(32)
    chexnet._fill_from_state_dict(reference, {key: value.numpy() for key, value in state_dict.items()}, source)
    converted = chexnet.build_chexnet(32)
    converted.load_weights(output)
    assert len(converted.weights) == len(reference.weights) > 600
    for mine, theirs in zip(converted.weights, reference.weights):
        assert np.array_equal(mine.numpy(), theirs.numpy()), mine.path

