"""PyTorch checkpoints read into NumPy without PyTorch, rebuilding only tensors and plain containers.

A ``.pth`` file is a pickle, and unpickling runs whatever callables it names. This reader unpickles
with a ``find_class`` that resolves only the globals a state dict needs (PyTorch's tensor rebuild
functions, its storage types, ``OrderedDict``...) to functions defined here, and refuses every other
global by name, which is the safety ``torch.load(weights_only=True)`` gives. Both of PyTorch's formats
are read: the zip archive of ``torch.save`` since 1.6 (``PREFIX/data.pkl`` beside ``PREFIX/data/KEY``
storages) and the legacy stream (magic number, protocol, system info, the pickled object, the storage
keys, then each storage's element count and bytes) that arnoweng/CheXNet's ``model.pth.tar`` is.

Tensors come back as C-contiguous arrays of their own dtype, except bfloat16, which NumPy lacks and
which becomes float32 (exactly: a bfloat16 is a truncated float32); views into one storage become
arrays of their own. Storages are sized from the file before they are read, so a truncated or
corrupted file is refused with its path, never over-allocated; reading takes about twice the
tensors' bytes at its peak (the storages and the arrays copied out of them).
"""

from __future__ import annotations

import collections
import os
import pickle
import tarfile
import zipfile
from typing import Any

import numpy as np

# What torch.save writes first in the legacy format (torch/serialization.py), and the format version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# PyTorch storage class -> the NumPy dtype of its elements ("bfloat16" is read as uint16 and widened).
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# torch dtype globals a checkpoint may hold as plain values (e.g. a training config); kept as their names.
_TORCH_DTYPE_NAMES = frozenset({
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128",
})
# Python 2 pickles (protocol 2, as torch.save writes) name these modules as Python 2 did.
_PYTHON2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class CheckpointError(ValueError):
    """A file that is no readable PyTorch checkpoint; ``reason`` says why, the message starts with the path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}.")
        self.path, self.reason = path, reason


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint only full unpickling (which runs code the file names) can read; ``reason`` names what."""


class _Malformed(Exception):
    """Raised inside the unpickler about the file's content; reported as a CheckpointError naming the path."""


class _Refused(Exception):
    """Raised inside the unpickler for a global that only full unpickling may resolve."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Frozen:
    """What the unpickler hands a pickle: BUILD cannot set its attributes, so no file can slip unchecked sizes
    past the checks or change how the next file is read."""

    __slots__ = ()

    def __init__(self, **fields: Any):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Malformed(f"it sets the attribute {name!r} of a global, which it may only call or refer to")


class _Storage(_Frozen):
    """A pickled reference to (part of) a storage: its key, element dtype and element range."""

    __slots__ = ("key", "dtype", "start", "count")


class _Tensor(_Frozen):
    """A tensor whose storage bytes may not have been read yet (the legacy format stores them last)."""

    __slots__ = ("storage", "offset", "size", "stride")
    __hash__ = None  # a placeholder is replaced by its array, so it must not become a dict key

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        if not isinstance(storage, _Storage):
            raise _Malformed(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage")
        for name, value in (("offset", (offset,)), ("size", size), ("stride", stride)):
            if not isinstance(value, tuple) or not all(isinstance(v, int) and v >= 0 for v in value):
                raise _Malformed(f"a tensor has the invalid {name} {value!r}")
        if len(size) != len(stride):
            raise _Malformed(f"a tensor has size {size} but stride {stride}")
        super().__init__(storage=storage, offset=offset, size=size, stride=stride)


class _Marker(_Frozen):
    """What a torch class that pickles name but that is never called here resolves to (storage types...)."""

    __slots__ = ("name",)


class _Call(_Frozen):
    """A function a pickle may call, behind an object whose attributes (defaults, code) it cannot set."""

    __slots__ = ("function",)

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
    """torch._utils._rebuild_tensor and _rebuild_tensor_v2 (requires_grad, hooks and metadata do not matter)."""
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data here."""
    return data


def _rebuild_from_type(function, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: a tensor (subclass) rebuilt by ``function``; Python attributes dropped."""
    return function(*args)


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode, which protocol-2 pickles use for bytes (always as latin-1 text)."""
    if encoding not in ("latin1", "latin-1"):
        raise _Malformed(f"bytes are encoded as {encoding!r}, not latin-1")
    return text.encode("latin-1")


def _device(kind: str, index: int | None = None) -> str:
    """torch.device, kept as its name ('cpu', 'cuda:0')."""
    return kind if index is None else f"{kind}:{index}"


# The globals a pickle may name. Types are built-in ones, whose attributes no pickle can set (BUILD),
# and functions are behind _Call: one file cannot change how the next is read.
_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "_codecs.encode": _Call(function=_encode),
    "torch._utils._rebuild_tensor": _Call(function=_rebuild_tensor),
    "torch._utils._rebuild_tensor_v2": _Call(function=_rebuild_tensor),
    "torch._utils._rebuild_parameter": _Call(function=_rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": _Call(function=_rebuild_parameter),
    "torch._tensor._rebuild_from_type_v2": _Call(function=_rebuild_from_type),
    "torch.Size": tuple,
    "torch.device": _Call(function=_device),
    "torch.Tensor": _Marker(name="torch.Tensor"),
    "torch.nn.parameter.Parameter": _Marker(name="torch.nn.parameter.Parameter"),
    "torch.storage.UntypedStorage": _Marker(name="UntypedStorage"),
    **{f"torch.{name}": _Marker(name=name) for name in _STORAGE_DTYPES},
    **{f"torch.{name}": f"torch.{name}" for name in _TORCH_DTYPE_NAMES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only ``_GLOBALS``; records the storages the pickle refers to."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")  # as torch.load reads Python 2 strings
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{_PYTHON2_MODULES.get(module, module)}.{name}"
        if qualified in _GLOBALS:
            return _GLOBALS[qualified]
        if qualified.startswith("torch._utils._rebuild_"):  # safe for torch, but no dense tensor
            raise _Malformed(f"it holds a kind of tensor this reader does not rebuild ({qualified}), "
                             "only dense ones")
        raise _Refused(qualified)

    def persistent_load(self, saved_id: Any) -> _Storage:
        """('storage', type, key, location, numel[, view]) -> the storage, or the legacy view into it."""
        if not isinstance(saved_id, tuple) or len(saved_id) not in (5, 6) or _text(saved_id[0]) != "storage":
            kind = _text(saved_id[0]) if isinstance(saved_id, tuple) and saved_id else type(saved_id).__name__
            raise _Malformed(f"the pickle refers to an unknown kind of saved object ({kind!r})")
        storage_type, key, numel = saved_id[1], _text(saved_id[2]), saved_id[4]
        if not isinstance(storage_type, _Marker) or storage_type.name not in _STORAGE_DTYPES:
            raise _Malformed(f"storage {key!r} has no storage type")
        if not isinstance(numel, int) or numel < 0:
            raise _Malformed(f"storage {key!r} has the invalid size {numel!r}")
        root = self.storages.setdefault(key, _Storage(key=key, dtype=_STORAGE_DTYPES[storage_type.name],
                                                         start=0, count=numel))
        view = saved_id[5] if len(saved_id) == 6 else None
        if view is None:
            return root
        _, start, count = view  # pre-1.0 views: element offset and length within the root storage
        if not (isinstance(start, int) and isinstance(count, int) and 0 <= start and start + count <= root.count):
            raise _Malformed(f"a view of storage {key!r} lies outside it")
        return _Storage(key=key, dtype=root.dtype, start=start, count=count)


def _text(value: Any) -> Any:
    """Python 2 pickles may hold torch's internal names as bytes."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def load_checkpoint(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path``, each tensor a NumPy array (bfloat16 as float32).

    Raises UnsafeCheckpointError for a file that needs full unpickling (naming the global) and
    CheckpointError for anything else that is no readable checkpoint; both messages start with ``path``.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(4)
            if head == b"PK\x03\x04":  # torch checks the same bytes to tell its zip format
                return _load_zip(path)
            file.seek(0)
            return _load_legacy(path, file)
    except CheckpointError:
        raise
    except _Refused as refused:
        raise UnsafeCheckpointError(path, f"it names the Python object {refused.name}") from None
    except _Malformed as error:
        raise CheckpointError(path, f"not a valid PyTorch checkpoint: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, RecursionError, OverflowError) as error:
        detail = str(error).split("\n")[0][:120] or type(error).__name__
        raise CheckpointError(path, f"its pickled object is truncated or corrupted ({detail})") from None
    except zipfile.BadZipFile as error:
        raise CheckpointError(path, f"a truncated or corrupted zip archive ({error})") from None
    except OSError as error:
        raise CheckpointError(path, f"cannot be read ({error.strerror or error})") from None


def _load_zip(path: str) -> Any:
    """The zip format: PREFIX/data.pkl, PREFIX/data/KEY per storage, PREFIX/byteorder (absent: little)."""
    with zipfile.ZipFile(path) as archive:
        names = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            found = "no" if not pickles else f"{len(pickles)}"
            raise CheckpointError(path, f"a zip archive with {found} PREFIX/data.pkl, so no PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names or any(name.startswith(f"{prefix}code/") for name in names):
            raise CheckpointError(path, "a TorchScript archive (a compiled model), not a checkpoint of tensors")
        byteorder = archive.read(names[f"{prefix}byteorder"]).decode("ascii", "replace").strip() \
            if f"{prefix}byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(path, f"its byteorder record says {byteorder!r}")
        storages: dict[str, _Storage] = {}
        with archive.open(names[pickles[0]]) as pickled:
            result = _Unpickler(pickled, storages).load()
        buffers = {}
        for key, storage in storages.items():
            member = names.get(f"{prefix}data/{key}")
            nbytes = storage.count * _itemsize(storage.dtype)
            if member is None or member.file_size != nbytes:
                found = "missing" if member is None else f"{member.file_size} bytes"
                raise CheckpointError(path, f"storage {key} should have {nbytes} bytes in {prefix}data/{key}, "
                                            f"it is {found}")
            buffers[key] = archive.read(member)
    return _materialise(result, buffers, "<" if byteorder == "little" else ">")


def _load_legacy(path: str, file) -> Any:
    """The pre-zip stream: five pickles, then every storage as a little-endian int64 count and its bytes."""
    try:
        tarfile.open(fileobj=file, mode="r:").close()  # leaves ``file`` open
    except tarfile.TarError:
        file.seek(0)
    else:  # torch < 0.1.10 wrote tar archives of pickles; torch.load reads them only fully unpickling
        raise UnsafeCheckpointError(path, "it is in the .tar format of PyTorch before 0.1.10")
    try:
        magic = _Unpickler(file, {}).load()
    except Exception:  # any bytes reach the unpickler here, which fails on foreign ones with many types
        magic = None
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(path, "neither a zip archive nor PyTorch's legacy format (no magic number at its "
                                    "start): another kind of file or not a checkpoint at all")
    protocol = _Unpickler(file, {}).load()
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(path, f"legacy format of an unknown protocol version {protocol!r}")
    _Unpickler(file, {}).load()  # system info: torch writes the storages little-endian whatever it says
    storages: dict[str, _Storage] = {}
    result = _Unpickler(file, storages).load()
    keys = _Unpickler(file, {}).load()
    keys = [_text(key) for key in keys] if isinstance(keys, list) else None
    if keys is None or sorted(keys) != sorted(storages):
        raise CheckpointError(path, "its list of storages does not match the storages its object refers to")
    size = os.fstat(file.fileno()).st_size
    buffers = {}
    for key in keys:
        storage, position = storages[key], file.tell()
        header = file.read(8)
        count = int.from_bytes(header, "little", signed=True) if len(header) == 8 else -1
        nbytes = count * _itemsize(storage.dtype)
        if count < 0 or position + 8 + nbytes > size:
            raise CheckpointError(path, f"truncated: storage {key} at byte {position} needs "
                                        f"{max(nbytes, 0) + 8} bytes, the file ends at byte {size}")
        if count != storage.count:
            raise CheckpointError(path, f"storage {key} holds {count} elements, its tensors expect {storage.count}")
        buffers[key] = file.read(nbytes)
    return _materialise(result, buffers, "<")


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _array(tensor: _Tensor, buffers: dict[str, bytes], order: str) -> np.ndarray:
    """One tensor copied out of its storage's bytes, after checking that its strides stay inside them."""
    storage = tensor.storage
    raw_dtype = np.dtype("uint16" if storage.dtype == "bfloat16" else storage.dtype).newbyteorder(order)
    elements = np.frombuffer(buffers[storage.key], dtype=raw_dtype)[storage.start: storage.start + storage.count]
    if 0 in tensor.size:
        values = np.empty(tensor.size, raw_dtype)
    else:
        last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
        if last >= len(elements):
            raise _Malformed(f"a tensor of size {tensor.size} reaches element {last} of storage {storage.key}, "
                             f"which has {len(elements)}")
        if np.prod(tensor.size, dtype=object) > len(elements):  # copying it out would take unbounded memory
            raise _Malformed(f"a tensor of size {tensor.size} repeats the {len(elements)} elements of storage "
                             f"{storage.key} (an expanded view), which this reader does not copy out")
        strides = tuple(s * raw_dtype.itemsize for s in tensor.stride)
        values = np.lib.stride_tricks.as_strided(elements[tensor.offset:], tensor.size, strides, writeable=False)
    values = np.array(values, dtype=raw_dtype.newbyteorder("="))  # a copy: views no longer share memory
    if storage.dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def _materialise(item: Any, buffers: dict[str, bytes], order: str, seen: set[int] | None = None) -> Any:
    """``item`` with every placeholder tensor replaced by its array, in place where containers allow it."""
    seen = set() if seen is None else seen
    if isinstance(item, _Tensor):
        return _array(item, buffers, order)
    if isinstance(item, _Frozen):
        raise _Malformed(f"it holds a bare {type(item).__name__.strip('_').lower()} where a tensor or value belongs")
    if id(item) in seen or not isinstance(item, (dict, list, tuple)):
        return item
    seen.add(id(item))  # a pickle may hold a container twice, or inside itself
    if isinstance(item, tuple):
        return tuple(_materialise(element, buffers, order, seen) for element in item)
    if isinstance(item, dict):
        for key, element in list(item.items()):
            item[key] = _materialise(element, buffers, order, seen)
    else:
        item[:] = [_materialise(element, buffers, order, seen) for element in item]
    return item
