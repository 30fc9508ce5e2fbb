"""Training-step throughput: the Keras 3 model of xray_tf against PyTorch, same architecture and batch.

Both sides train the same network shape (Keras' ResNet50 v1 or DenseNet121 with a 4-way softmax
head) from uint8 grey images: cast, repeat to 3 channels, normalise, forward, cross-entropy,
backward, Adam step. Inputs are random and resident in memory, so the input pipeline is out of the
measurement. Each side is built and compiled once; then timed windows of ``--steps`` steps
alternate (Keras, PyTorch, Keras, ...) and the script prints the median images/s of each and
their ratio. On the CPU use small images (64-128 px) and a few steps; on a GPU
run Keras on the JAX backend (``KERAS_BACKEND=jax``) with ``--precision=bfloat16``.

Both sides queue their steps and wait for the device once per window, as a training loop does:
PyTorch eager reads the loss after the last step only, and Keras trains with ``fit`` (on a
resident batch repeated by tf.data; a window is the second of two epochs, so that ``fit``'s own
set-up is not timed). ``--keras_loop=train_on_batch`` returns each step's loss as a NumPy value,
so Keras waits for every step while PyTorch does not.

    python -m benchmarks.train_step --model=resnet50 --image_size=96 --batch_size=16 --steps=5
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

from xray_tf import cli

flags.DEFINE_enum("model", "resnet50", ["resnet50", "densenet121"], "The network both sides train.")
flags.DEFINE_integer("image_size", 96, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("steps", 5, "Steps per timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows per side, alternating.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "float32, or mixed bfloat16 on both sides.")
flags.DEFINE_string("jit_compile", "auto", "Keras compile(jit_compile=...): auto, True or False.")
flags.DEFINE_enum("keras_loop", "fit", ["fit", "train_on_batch"], "How the Keras side is driven (see above).")
FLAGS = flags.FLAGS


def keras_trainer(images: np.ndarray, labels: np.ndarray) -> Callable[[], float]:
    """Build and compile the Keras side once (two warm-up steps compile it); return its timer."""
    import keras

    from benchmarks import timing
    from xray_tf import models

    if FLAGS.precision == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    model = models.build_model(FLAGS.model, 4, FLAGS.image_size, weights="none")
    jit_compile = {"true": True, "false": False}.get(FLAGS.jit_compile.lower(), "auto")
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(), jit_compile=jit_compile)
    if FLAGS.keras_loop == "train_on_batch":
        return _timer("Keras", len(images), lambda: model.train_on_batch(images, labels),
                      lambda loss: float(np.asarray(loss)))

    import tensorflow as tf

    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    start = time.perf_counter()
    timing.timed_fit(model, batches, steps=2, epochs=1)
    print(f"  Keras warm-up, 2 steps (compilation included): {time.perf_counter() - start:.1f} s", flush=True)

    def images_per_second() -> float:
        return FLAGS.steps * len(images) / timing.timed_fit(model, batches, FLAGS.steps, epochs=2)[-1]

    return images_per_second


def _timer(side: str, batch_size: int, step: Callable, wait: Callable) -> Callable[[], float]:
    """Run two warm-up steps now; the returned function times ``--steps`` more and gives images/s.

    ``wait(result)`` blocks until the device has finished the step that produced ``result``.
    """
    start = time.perf_counter()
    for _ in range(2):
        wait(step())
    print(f"  {side} warm-up, 2 steps (compilation included): {time.perf_counter() - start:.1f} s", flush=True)

    def images_per_second() -> float:
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            result = step()
        wait(result)
        return FLAGS.steps * batch_size / (time.perf_counter() - start)

    return images_per_second


def torch_model(name: str):
    """ResNet50 v1 (stride in the first 1x1 conv, like Keras) or DenseNet121, with a 4-way head."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list:
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]

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


def torch_trainer(images: np.ndarray, labels: np.ndarray) -> Callable[[], float]:
    """Build the PyTorch side once (eager, channels-last, bf16 autocast if asked); return its timer."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch_model(FLAGS.model).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    x_uint8 = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).long().to(device)

    def step():
        x = x_uint8.permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=FLAGS.precision == "bfloat16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return _timer("PyTorch", len(images), step, lambda loss: loss.item())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import keras  # after flag parsing, so that --help is fast

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, FLAGS.batch_size).astype(np.int32)
    print(f"{FLAGS.model}, {FLAGS.image_size} px, batch {FLAGS.batch_size}, {FLAGS.precision}, "
          f"Keras backend {keras.backend.backend()} ({FLAGS.keras_loop}), {FLAGS.steps} steps x {FLAGS.repeats} "
          "alternating repeats", flush=True)
    time_keras, time_torch = keras_trainer(images, labels), torch_trainer(images, labels)
    ours, theirs = [], []
    for repeat in range(FLAGS.repeats):
        ours.append(time_keras())
        theirs.append(time_torch())
        print(f"  repeat {repeat + 1}: Keras {ours[-1]:.1f} img/s, PyTorch {theirs[-1]:.1f} img/s", flush=True)
    keras_rate, torch_rate = statistics.median(ours), statistics.median(theirs)
    print(f"| {FLAGS.model} | {FLAGS.image_size} | {FLAGS.batch_size} | {FLAGS.precision} | {keras.backend.backend()}, "
          f"{FLAGS.keras_loop} | {keras_rate:.1f} | {torch_rate:.1f} | {keras_rate / torch_rate:.2f} |")


if __name__ == "__main__":
    cli.start(main)
