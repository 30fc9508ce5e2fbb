"""CheXNet (DenseNet-121, 14 chest X-ray findings) from PyTorch to Keras, exactly or not at all.

CheXNet is distributed as the PyTorch checkpoint ``model.pth.tar`` of the arnoweng/CheXNet
repository. This module maps every tensor of such a checkpoint onto ``keras.applications``'
DenseNet121 and refuses, listing every problem, when a single tensor is unmapped, missing or of
the wrong shape: a partially converted backbone would train without error and silently be worse.
The same mapping reads torchvision's ImageNet DenseNet-121 checkpoint, so ``--model=densenet121
--weights=FILE.pth`` works offline.

Convert with ``xray-convert-chexnet --input model.pth.tar --output chexnet_densenet121.weights.h5``.
Checkpoints are read without PyTorch (``xray_tf.torch_checkpoint``); PyTorch is imported only when
``allow_pickle`` fully unpickles a checkpoint that safe reader refuses. The converted Keras file needs
nothing but Keras. Only Keras 3 APIs are used for the model.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping

import keras
import numpy as np

from xray_tf import rundir, torch_checkpoint
from xray_tf.config import ConfigError

# Output order of CheXNet's classifier (arnoweng/CheXNet, ChestX-ray14 label order).
CHEXNET_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                   "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")

# torch.nn.BatchNorm2d's default. keras.applications' DenseNet uses 1.001e-5, which would shift
# every normalised activation by ~5e-6 relative per layer, compounding over 121 layers; the
# converted model uses PyTorch's value so it reproduces the checkpoint's outputs exactly.
TORCH_BN_EPSILON = 1e-5

# Prefixes that wrappers add in front of torchvision's names: DataParallel ("module.") and
# CheXNet's own module holding the torchvision DenseNet as attribute "densenet121".
_WRAPPER_PREFIXES = ("module.", "densenet121.")

# torchvision < 0.3 named dense-layer modules "norm.1", "conv.2", ...; torchvision itself renames
# them with this pattern when loading old checkpoints (torchvision.models.densenet).
_LEGACY_DENSE_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)

# Keras DenseNet121 layer names that do not follow a block pattern -> torchvision module names.
_FIXED_MODULES = {
    "conv1_conv": "features.conv0",
    "conv1_bn": "features.norm0",
    "bn": "features.norm5",
    "chexnet_classifier": "classifier.0",
}
# Keras dense-layer suffix -> torchvision dense-layer module: Keras "0_bn, 1_conv, 1_bn, 2_conv" are
# torchvision's "norm1, conv1, norm2, conv2" (Keras numbers the convolutions, torch the layers).
_DENSE_LAYER_MODULES = {"0_bn": "norm1", "1_conv": "conv1", "1_bn": "norm2", "2_conv": "conv2"}

# Classifier tensors that a backbone has no place for: CheXNet's 14-way and torchvision's 1000-way.
_CLASSIFIER_KEYS = frozenset({"classifier.0.weight", "classifier.0.bias", "classifier.weight", "classifier.bias"})

_MAX_LISTED = 10  # per kind of problem, so that a refusal stays one readable paragraph
_MAX_REASON = 200  # characters of torch's own explanation
_TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def _densenet121(image_size: int) -> keras.Model:
    """Keras DenseNet121 trunk (no top) with PyTorch's BatchNorm epsilon."""
    backbone = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.epsilon = TORCH_BN_EPSILON  # read at call time and saved in the layer config
    return backbone


def build_chexnet(image_size: int = 224) -> keras.Model:
    """CheXNet in Keras: ImageNet-normalised float RGB ``[B, H, W, 3]`` -> 14 sigmoid probabilities.

    The layers match torchvision's DenseNet-121 one to one (final ReLU included, as in
    ``DenseNet.forward``), so a converted checkpoint reproduces PyTorch's outputs. The weights do
    not depend on ``image_size``; CheXNet itself was trained on 224 px crops.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = _densenet121(image_size)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    outputs = keras.layers.Dense(len(CHEXNET_CLASSES), activation="sigmoid", name="chexnet_classifier")(pooled)
    return keras.Model(inputs, outputs, name="chexnet")


def _load_torch_state_dict(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint into float32 numpy arrays keyed as in the file, or refuse naming it.

    The safe reader rebuilds only tensors and plain containers, without PyTorch; full unpickling
    runs whatever code the file names, so it needs the caller's explicit consent (and PyTorch).
    Every refusal is one sentence that starts with ``path``: a command prints it as it is, without
    a traceback.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a PyTorch checkpoint such as CheXNet's model.pth.tar).")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty, not a PyTorch checkpoint (an interrupted download?).")
    try:
        state_dict = _state_dict(path, torch_checkpoint.load_checkpoint(path))
    except torch_checkpoint.UnsafeCheckpointError as error:
        if not allow_pickle:
            raise ValueError(f"{path}: {error.reason}, so only full unpickling can read it, and that executes code "
                             "named in the file. Pass --allow_pickle (allow_pickle=True) only if you trust its "
                             "source.") from error
        state_dict = _unpickle_fully(path, error.reason)
    except torch_checkpoint.CheckpointError as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: {error.reason}.") from error
    not_tensors = sorted(str(k) for k, value in state_dict.items() if not isinstance(value, np.ndarray))
    if not_tensors:
        raise ValueError(f"{path}: {_listing('state dict entries that are not tensors', not_tensors)}.")
    return {key: value.astype(np.float32, copy=False) for key, value in state_dict.items()}  # as Keras variables


def _state_dict(path: str, checkpoint: object) -> Mapping:
    """The state dict in a checkpoint: the checkpoint itself or its 'state_dict' entry."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        empty = " (empty)" if isinstance(checkpoint, Mapping) else ""
        raise ValueError(f"{path}: expected a state dict or a dict with a 'state_dict' entry, "
                         f"got {type(checkpoint).__name__}{empty}.")
    return checkpoint


def _unpickle_fully(path: str, refusal: str) -> dict[str, object]:
    """The state dict of a checkpoint the safe reader refused (``refusal`` says why), read by PyTorch."""
    try:
        import torch  # the `convert` extra; only full unpickling needs it
    except ImportError as error:
        raise ValueError(f"{path}: {refusal}, so only full unpickling by PyTorch can read it, and PyTorch is not "
                         f"installed ({error}); install its CPU build: {_TORCH_INSTALL}") from error
    warnings.warn(f"Fully unpickling {path!r}: this executes code from the file; only do it for a checkpoint "
                  "from a trusted source.", stacklevel=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notices about old formats it reads anyway
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # the file's own code may raise anything
        raise ValueError(f"{path}: not a readable PyTorch checkpoint, even fully unpickled: "
                         f"{_torch_reason(error)}.") from error
    # .float() first: numpy has no bfloat16, and Keras variables are float32 anyway.
    return {key: value.detach().cpu().float().numpy() if torch.is_tensor(value) else value
            for key, value in _state_dict(path, checkpoint).items()}


def _torch_reason(error: Exception) -> str:
    """torch's failure in one short line: the first line of its message, whole sentences up to a cap."""
    lines = str(error).strip().splitlines()
    reason = (f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__).rstrip(".")
    if len(reason) > _MAX_REASON:
        end = reason.rfind(". ", 0, _MAX_REASON)
        reason = reason[:end] if end > 0 else reason[:_MAX_REASON] + " [...]"
    return reason


def _normalise_key(key: str) -> str:
    """Checkpoint key -> modern torchvision DenseNet key (wrappers stripped, legacy names fixed)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    match = _LEGACY_DENSE_LAYER_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _torch_module(keras_layer_name: str) -> str | None:
    """Keras DenseNet121/CheXNet layer name -> torchvision module name, None if it has none."""
    if keras_layer_name in _FIXED_MODULES:
        return _FIXED_MODULES[keras_layer_name]
    # Keras stage N+1 ("conv2".."conv5", "pool2".."pool4") is torchvision's denseblockN/transitionN.
    match = re.fullmatch(r"conv(\d)_block(\d+)_(0_bn|1_conv|1_bn|2_conv)", keras_layer_name)
    if match:
        block, layer, part = int(match[1]) - 1, int(match[2]), _DENSE_LAYER_MODULES[match[3]]
        return f"features.denseblock{block}.denselayer{layer}.{part}"
    match = re.fullmatch(r"pool(\d)_(bn|conv)", keras_layer_name)
    if match:
        return f"features.transition{int(match[1]) - 1}.{'norm' if match[2] == 'bn' else 'conv'}"
    return None


def _parameter_targets(layer: keras.layers.Layer) -> list[tuple[keras.Variable, str, tuple[int, ...] | None]]:
    """(Keras variable, torch parameter name, transpose from torch to Keras layout) per variable."""
    if isinstance(layer, keras.layers.Conv2D):
        # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
        targets = [(layer.kernel, "weight", (2, 3, 1, 0))]
        return targets + ([(layer.bias, "bias", None)] if layer.use_bias else [])
    if isinstance(layer, keras.layers.BatchNormalization):
        return [
            (layer.gamma, "weight", None),
            (layer.beta, "bias", None),
            (layer.moving_mean, "running_mean", None),
            (layer.moving_variance, "running_var", None),
        ]
    if isinstance(layer, keras.layers.Dense):
        return [(layer.kernel, "weight", (1, 0)), (layer.bias, "bias", None)]  # torch (out, in)
    return []


def _weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Leaf layers holding weights, looking inside nested models (the DenseNet in CheXNet)."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(_weighted_layers(layer))
        elif layer.weights:
            layers.append(layer)
    return layers


def _listing(title: str, items: list[str]) -> str:
    """One clause of a refusal, capped so that a wholly wrong checkpoint stays readable."""
    shown = items[:_MAX_LISTED]
    more = f" and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{title} ({len(items)}): " + ", ".join(shown) + more


def _fill_from_state_dict(model: keras.Model, state_dict: Mapping[str, np.ndarray], source: str,
                          discard: frozenset[str] = frozenset()) -> None:
    """Assign every weight of ``model`` from ``state_dict``, or raise and assign nothing.

    All problems are collected before anything is assigned: checkpoint keys with no Keras
    counterpart (except the normalised keys in ``discard``), Keras weights with no checkpoint
    tensor, and shape mismatches. ``num_batches_tracked`` is optional: older PyTorch versions did
    not save it and inference does not use it.
    """
    by_normalised_key: dict[str, str] = {}
    for key in state_dict:
        normalised = _normalise_key(key)
        if normalised in by_normalised_key:
            first = by_normalised_key[normalised]
            raise ValueError(f"{source}: keys {first!r} and {key!r} both name {normalised!r}.")
        by_normalised_key[normalised] = key

    used: set[str] = set()
    unfilled: list[str] = []
    mismatched: list[str] = []
    assignments: list[tuple[keras.Variable, np.ndarray]] = []
    for layer in _weighted_layers(model):
        module = _torch_module(layer.name)
        targets = _parameter_targets(layer) if module else []
        covered = {id(variable) for variable, _, _ in targets}
        unfilled += [
            f"{v.path} (no PyTorch counterpart)" for v in layer.weights if id(v) not in covered
        ]
        for variable, parameter, axes in targets:
            torch_key = f"{module}.{parameter}"
            if torch_key not in by_normalised_key:
                unfilled.append(f"{variable.path} (needs {torch_key!r})")
                continue
            used.add(torch_key)
            original_key = by_normalised_key[torch_key]
            value = state_dict[original_key]
            expected = tuple(variable.shape)
            if axes is not None:
                expected = tuple(expected[axis] for axis in np.argsort(axes))  # in torch layout
            if value.shape != expected:
                mismatched.append(
                    f"{original_key}: shape {value.shape} in the checkpoint, {expected} expected "
                    f"for {variable.path}"
                )
                continue
            assignments.append((variable, value if axes is None else np.transpose(value, axes)))
        if module and isinstance(layer, keras.layers.BatchNormalization):
            used.add(f"{module}.num_batches_tracked")

    unmapped = [key for k, key in by_normalised_key.items() if k not in used and k not in discard]
    if not assignments and not mismatched:  # not one tensor matched: another architecture altogether
        raise ValueError(f"{source}: none of its tensors ({len(state_dict)}) belongs to a DenseNet-121 (keys such as "
                         f"{', '.join(list(state_dict)[:3])}), so it is no CheXNet or torchvision DenseNet-121 "
                         "checkpoint; nothing was converted.")
    if unmapped or unfilled or mismatched:
        problems = [_listing(title, items) for title, items in (("unmapped checkpoint keys", unmapped),
                                                                ("unfilled Keras weights", unfilled),
                                                                ("shape mismatches", mismatched)) if items]
        hint = ""
        if "classifier.weight" in by_normalised_key and "classifier.weight" not in discard:
            hint = (" This looks like torchvision's ImageNet DenseNet-121 (1000-way 'classifier'), not CheXNet: use "
                    "it directly with --model=densenet121 --weights=FILE.")
        raise ValueError(f"{source}: does not convert exactly onto Keras {model.name!r}, so nothing was converted; "
                         + "; ".join(problems) + "." + hint)
    for variable, value in assignments:
        variable.assign(value)


def convert_checkpoint(input_path: str, output_path: str, allow_pickle: bool = False) -> keras.Model:
    """Convert CheXNet's ``model.pth.tar`` into a Keras ``.weights.h5`` of :func:`build_chexnet`.

    The 14-way classifier is converted too, so the Keras model reproduces CheXNet's outputs. The
    file is written only after every tensor has been mapped, and whole or not at all (a temporary
    renamed onto ``output_path``); the converted model is returned.
    """
    _check_output(output_path)
    state_dict = _load_torch_state_dict(input_path, allow_pickle)
    model = build_chexnet()
    _fill_from_state_dict(model, state_dict, source=input_path)
    rundir.write_atomic(output_path, model.save_weights)
    return model


def _check_output(path: str) -> None:
    """Refuse an output the weights cannot be written to, before the slow reading and converting."""
    if not path.endswith(".weights.h5"):
        raise ConfigError("output", path, "must end in '.weights.h5' (Keras weights).")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError("output", path, "is a folder; name the .weights.h5 file to write.")
    if not os.path.isdir(folder):
        raise ConfigError("output", path, f"its folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise ConfigError("output", path, f"its folder {folder} is not writable.")


def densenet121_backbone_from_torch(path: str, image_size: int, allow_pickle: bool = False) -> keras.Model:
    """DenseNet121 trunk filled from a torchvision (or CheXNet) PyTorch checkpoint, in memory.

    This is what ``--model=densenet121 --weights=FILE.pth`` uses: a new head is trained, so the
    checkpoint's classifier (1000-way ImageNet or 14-way CheXNet) is deliberately discarded; every
    other tensor must map.
    """
    state_dict = _load_torch_state_dict(path, allow_pickle)
    backbone = _densenet121(image_size)
    _fill_from_state_dict(backbone, state_dict, source=path, discard=_CLASSIFIER_KEYS)
    return backbone


def load_chexnet_backbone(weights_path: str, image_size: int) -> keras.Model:
    """Converted CheXNet file -> its DenseNet121 trunk (normalised float RGB -> feature map).

    Used by ``--model=densenet_chexnet`` for transfer learning: the trunk is kept and the 14-way
    classifier is left behind, a new head is trained on top.
    """
    if not os.path.isfile(weights_path):
        raise ConfigError("chexnet_weights", weights_path, "no such file; create it with "
                          "`xray-convert-chexnet --input model.pth.tar --output FILE.weights.h5`.")
    model = build_chexnet(image_size)
    try:
        model.load_weights(weights_path)
    except Exception as error:  # Keras raises several types for a file of another architecture
        raise ConfigError("chexnet_weights", weights_path, f"not a converted CheXNet weights file "
                          f"(xray-convert-chexnet): {error}") from error
    return model.get_layer("densenet121")
