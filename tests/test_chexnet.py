"""CheXNet PyTorch -> Keras conversion: exact outputs, loud refusal of anything inexact or unsafe.

The reference is a DenseNet-121 written here in plain torch.nn with torchvision's architecture and
module names (torchvision is not installed), given random weights and real BatchNorm running
statistics, then saved the way CheXNet's ``model.pth.tar`` is. Images are 64 px to stay fast on a
shared CPU; the arithmetic does not depend on the size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch (the `convert` extra) is needed to build reference checkpoints"
)
nn = torch.nn

import keras  # noqa: E402  (after the skip: nothing to test without torch)

from xray_tf import chexnet, models  # noqa: E402

IMAGE_SIZE = 64
ATOL = 1e-4


class _DenseLayer(nn.Sequential):
    """torchvision ``_DenseLayer`` (bn_size 4, growth 32), as a Sequential with its module names."""

    def __init__(self, in_features: int):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(in_features))
        self.add_module("relu1", nn.ReLU())
        self.add_module("conv1", nn.Conv2d(in_features, 128, 1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(128))
        self.add_module("relu2", nn.ReLU())
        self.add_module("conv2", nn.Conv2d(128, 32, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, super().forward(x)], 1)


class _DenseNet121(nn.Module):
    """torchvision ``densenet121`` (blocks 6, 12, 24, 16) with a configurable classifier."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        layers = OrderedDict(
            conv0=nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(64),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        features = 64
        for block, count in enumerate((6, 12, 24, 16), start=1):
            dense_block = nn.Sequential()
            for index in range(1, count + 1):
                dense_block.add_module(f"denselayer{index}", _DenseLayer(features))
                features += 32
            layers[f"denseblock{block}"] = dense_block
            if block < 4:
                layers[f"transition{block}"] = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(features),
                        relu=nn.ReLU(),
                        conv=nn.Conv2d(features, features // 2, 1, bias=False),
                        pool=nn.AvgPool2d(2, stride=2),
                    )
                )
                features //= 2
        layers["norm5"] = nn.BatchNorm2d(features)
        self.features = nn.Sequential(layers)
        self.classifier = classifier

    def pooled(self, x):
        out = torch.relu(self.features(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x):
        return self.classifier(self.pooled(x))


def _randomised(num_classes: int, sigmoid: bool, seed: int) -> _DenseNet121:
    """Random weights; BatchNorm statistics measured on random images, then perturbed.

    The classifier is scaled so that CheXNet's sigmoids are mostly unsaturated, otherwise equal
    outputs would prove little.
    """
    torch.manual_seed(seed)
    linear = nn.Linear(1024, num_classes)
    nn.init.normal_(linear.weight, 0.0, 0.003)
    nn.init.normal_(linear.bias, 0.0, 0.5)
    model = _DenseNet121(nn.Sequential(linear, nn.Sigmoid()) if sigmoid else linear)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of the batches below
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(0.05 * torch.randn_like(module.running_mean))
                module.running_var.mul_(torch.empty_like(module.running_var).uniform_(0.8, 1.25))
    return model.eval()


def _chexnet_checkpoint(model: _DenseNet121) -> dict:
    """``model.pth.tar`` layout: DataParallel + CheXNet wrapper prefix, legacy dense-layer names,
    no num_batches_tracked, state dict inside a dict with training metadata."""
    state_dict = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)
        state_dict[f"module.densenet121.{key}"] = value.clone()
    return {"epoch": 10, "arch": "densenet121", "best_loss": 0.15, "state_dict": state_dict}


@pytest.fixture(scope="module")
def chexnet_torch() -> _DenseNet121:
    return _randomised(14, sigmoid=True, seed=0)


@pytest.fixture(scope="module")
def chexnet_pth(chexnet_torch, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("torch") / "model.pth.tar")
    torch.save(_chexnet_checkpoint(chexnet_torch), path)
    return path


@pytest.fixture(scope="module")
def converted(chexnet_pth, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("keras") / "chexnet_densenet121.weights.h5")
    chexnet.convert_checkpoint(chexnet_pth, path)
    return path


def _images(count: int, seed: int) -> np.ndarray:
    """ImageNet-normalised float32 RGB images, NHWC."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0.0, 1.0, (count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    return (pixels - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])


def _torch_apply(function, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return function(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _assert_features_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Pooled features are O(10), not O(1) like probabilities: the tolerance is relative to them."""
    tolerance = ATOL * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, atol=tolerance, rtol=0)


def test_converted_chexnet_reproduces_pytorch_outputs(chexnet_torch, converted):
    images = _images(4, seed=1)
    expected = _torch_apply(chexnet_torch, images)
    model = chexnet.build_chexnet(IMAGE_SIZE)  # converted at 224 px: weights are size independent
    model.load_weights(converted)
    actual = keras.ops.convert_to_numpy(model(images, training=False))

    # The comparison means something only if the sigmoids are not saturated.
    assert 0.01 < expected.std() and ((expected > 0.02) & (expected < 0.98)).mean() > 0.5
    difference = np.abs(actual - expected).max()
    print(f"max |keras - torch| over {expected.size} CheXNet probabilities: {difference:.3g}")
    assert difference < ATOL
    batch_norms = [
        layer
        for layer in model.get_layer("densenet121").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert {layer.epsilon for layer in batch_norms} == {chexnet.TORCH_BN_EPSILON}


def test_densenet_chexnet_model_uses_converted_backbone_from_uint8(chexnet_torch, converted):
    model = models.build_model("densenet_chexnet", 4, IMAGE_SIZE, chexnet_weights=converted)
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    grey = np.random.default_rng(2).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    rgb = np.repeat(grey.astype("float32") / 255.0, 3, axis=-1)
    normalised = (rgb - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    expected = _torch_apply(chexnet_torch.pooled, normalised)
    actual = keras.ops.convert_to_numpy(features(grey, training=False))
    _assert_features_close(actual, expected)


def test_torchvision_imagenet_checkpoint_as_densenet121_weights(tmp_path):
    reference = _randomised(1000, sigmoid=False, seed=3)
    path = str(tmp_path / "densenet121-imagenet.pth")
    torch.save(reference.state_dict(), path)  # modern names, num_batches_tracked, bare state dict

    backbone = models.build_backbone("densenet121", IMAGE_SIZE, weights=path)
    images = _images(2, seed=4)
    expected = _torch_apply(reference.pooled, images)
    feature_map = backbone(images, training=False)
    actual = keras.ops.convert_to_numpy(keras.ops.mean(feature_map, axis=(1, 2)))
    _assert_features_close(actual, expected)

    with pytest.raises(ValueError, match="torchvision's ImageNet DenseNet-121"):
        chexnet.convert_checkpoint(path, str(tmp_path / "out.weights.h5"))


def _remove(state_dict):
    del state_dict["module.densenet121.features.denseblock2.denselayer3.norm.2.running_var"]
    return "features.denseblock2.denselayer3.norm2.running_var"


def _add(state_dict):
    state_dict["module.densenet121.features.extra.weight"] = torch.zeros(3)
    return "module.densenet121.features.extra.weight"


def _reshape(state_dict):
    key = "module.densenet121.features.transition3.conv.weight"
    state_dict[key] = torch.zeros(512, 1024, 3, 3)
    return key


@pytest.mark.parametrize(
    "corrupt", [_remove, _add, _reshape], ids=["missing", "extra", "wrong_shape"]
)
def test_inexact_checkpoint_is_refused_naming_the_key(chexnet_torch, corrupt, tmp_path):
    checkpoint = _chexnet_checkpoint(chexnet_torch)
    key = corrupt(checkpoint["state_dict"])
    source, output = str(tmp_path / "model.pth.tar"), str(tmp_path / "out.weights.h5")
    torch.save(checkpoint, source)
    with pytest.raises(ValueError, match=re.escape(key)) as refused:
        chexnet.convert_checkpoint(source, output)
    message = str(refused.value)
    assert message.startswith(f"{source}: does not convert exactly") and "\n" not in message  # one paragraph
    assert os.listdir(tmp_path) == ["model.pth.tar"]  # no output, no temporary


class _RunsCodeWhenUnpickled:
    """Stands for arbitrary pickled code: unpickling it creates a directory."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.slow
def test_checkpoint_needing_full_unpickling_is_refused_unless_allowed(chexnet_pth, tmp_path):
    checkpoint = torch.load(chexnet_pth, weights_only=True)
    marker = str(tmp_path / "code_was_executed")
    checkpoint["args"] = _RunsCodeWhenUnpickled(marker)
    source, output = str(tmp_path / "model.pth.tar"), str(tmp_path / "out.weights.h5")
    torch.save(checkpoint, source)

    with pytest.raises(ValueError, match="--allow_pickle"):
        chexnet.convert_checkpoint(source, output)
    assert not os.path.exists(marker) and not os.path.exists(output)

    command = [sys.executable, "-m", "xray_tf", "convert-chexnet", f"--input={source}", f"--output={output}"]
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, capture_output=True, text=True, cwd=repository)
    assert result.returncode == 1 and f"xray-convert-chexnet: error: {source}: " in result.stderr
    assert "--allow_pickle" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(marker) and not os.path.exists(output)

    with pytest.warns(UserWarning, match="executes code"), warnings.catch_warnings():
        # pytest.warns passes on every other warning as its own, past conftest's filter of Keras' NumPy 2 notice.
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        chexnet.convert_checkpoint(source, output, allow_pickle=True)
    assert os.path.exists(marker) and os.path.exists(output)


# Loading weights of another architecture on purpose: Keras warns about each layer before it fails.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_load_chexnet_backbone_names_a_missing_or_foreign_file(tmp_path):
    missing = str(tmp_path / "missing.weights.h5")
    with pytest.raises(ValueError, match=re.escape(missing)):
        chexnet.load_chexnet_backbone(missing, IMAGE_SIZE)
    foreign = str(tmp_path / "foreign.weights.h5")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(foreign)
    with pytest.raises(ValueError, match=re.escape(foreign)):
        chexnet.load_chexnet_backbone(foreign, IMAGE_SIZE)
