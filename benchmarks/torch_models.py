"""PyTorch twins of the Keras models the benchmarks time, so that both sides do the same arithmetic.

``benchmarks/train_step.py`` checks the twin's trainable parameter count against Keras'.
"""

from __future__ import annotations


def keras_twin(name: str):
    """Keras' ResNet50 v1 (stride in the first 1x1 conv, biased convolutions) or DenseNet121, 4-way head."""
    import torch
    from torch import nn

    biased = name == "resnet50"  # as in keras.applications: ResNet50's convolutions have biases, DenseNet's not

    def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list:
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=biased), nn.BatchNorm2d(cout)]

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, width, 1, stride), nn.ReLU(), *conv_bn(width, width, 3),
                                      nn.ReLU(), *conv_bn(width, width * 4, 1))
            self.shortcut = nn.Sequential(*conv_bn(cin, width * 4, 1, stride)) if stride > 1 or cin != width * 4 \
                else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    class DenseLayer(nn.Module):
        def __init__(self, cin: int):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 128, 1, bias=False),
                                      nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 32, 3, padding=1, bias=False))

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    layers = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    if name == "resnet50":
        cin = 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for block in range(blocks):
                layers.append(Bottleneck(cin, width, stride if block == 0 else 1))
                cin = width * 4
    else:
        cin = 64
        for i, blocks in enumerate([6, 12, 24, 16]):
            for _ in range(blocks):
                layers.append(DenseLayer(cin))
                cin += 32
            if i < 3:
                layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)]
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 4))
