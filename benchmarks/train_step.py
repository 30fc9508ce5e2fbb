"""Training-step throughput: the Keras 3 model of xray_tf against PyTorch, same architecture and batch.

Both sides train the same network shape (Keras' ResNet50 v1 or DenseNet121 with a 4-way softmax
head) from uint8 grey images: cast, repeat to 3 channels, normalise, forward, cross-entropy,
backward, Adam step. Inputs are random and resident in memory, so the input pipeline is out of the
measurement. Each side is built and compiled once; then timed windows of ``--steps`` steps
alternate (Keras, PyTorch, Keras, ...) and the script prints the median images/s of each and
the median of each repeat's ratio, with its range. On the CPU use small images (64-128 px) and
a few steps; on a GPU run Keras on the JAX backend (``KERAS_BACKEND=jax``) with
``--precision=bfloat16``.

Both sides queue their steps and wait for the device once per window, as a training loop does:
PyTorch reads the loss after the last step only, and Keras trains with ``fit`` (on a resident
batch repeated by tf.data; a window is the second of two epochs, so that ``fit``'s own set-up is
not timed). ``--keras_loop=train_on_batch`` returns each step's loss as a NumPy value, so Keras
waits for every step while PyTorch does not.

The PyTorch side is set up as a careful PyTorch user would: channels-last, ``cudnn.benchmark``
and fused Adam on a GPU, and ``--torch=eager,compile`` times it eagerly and under ``torch.compile``
(each its own model and optimizer), each against the same Keras windows. Its ResNet50 has
convolution biases like Keras' (``keras.applications`` gives every ResNet50 convolution one,
although batch norm follows): the script prints both sides' parameter counts, which must be
equal, so that both do the same arithmetic.

    python -m benchmarks.train_step --model=resnet50 --image_size=96 --batch_size=16 --steps=5
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

from benchmarks import torch_models
from xray_tf import cli

flags.DEFINE_enum("model", "resnet50", ["resnet50", "densenet121"], "The network both sides train.")
flags.DEFINE_integer("image_size", 96, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("steps", 5, "Steps per timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows per side, alternating.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "float32, or mixed bfloat16 on both sides.")
flags.DEFINE_string("jit_compile", "auto", "Keras compile(jit_compile=...): auto, True or False.")
flags.DEFINE_enum("keras_loop", "fit", ["fit", "train_on_batch"], "How the Keras side is driven (see above).")
flags.DEFINE_integer("threads", 0, "CPU threads of each side (TensorFlow's intra- and inter-op pools, PyTorch's); "
                     "0: each framework's default. 1 on a shared machine, where other processes' load stalls "
                     "multi-threaded PyTorch far more than TensorFlow.")
flags.DEFINE_multi_enum("torch", ["eager"], ["eager", "compile"], "PyTorch sides to time against Keras: eager, "
                        "torch.compile, or both (--torch=eager --torch=compile).")
FLAGS = flags.FLAGS


def keras_trainer(images: np.ndarray, labels: np.ndarray) -> tuple[Callable[[], float], int]:
    """Build and compile the Keras side once (two warm-up steps compile it); its timer and parameter count."""
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
                      lambda loss: float(np.asarray(loss))), _trainable_count(model)

    import tensorflow as tf

    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    start = time.perf_counter()
    timing.timed_fit(model, batches, steps=2, epochs=1)
    print(f"  Keras warm-up, 2 steps (compilation included): {time.perf_counter() - start:.1f} s", flush=True)

    def images_per_second() -> float:
        return FLAGS.steps * len(images) / timing.timed_fit(model, batches, FLAGS.steps, epochs=2)[-1]

    return images_per_second, _trainable_count(model)


def _trainable_count(model) -> int:
    """Trainable scalars: what PyTorch's ``parameters()`` counts (batch norm's moving statistics are buffers there)."""
    return sum(int(np.prod(variable.shape)) for variable in model.trainable_weights)


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


def torch_trainer(images: np.ndarray, labels: np.ndarray, mode: str) -> tuple[Callable[[], float], int]:
    """Build one PyTorch side (``mode`` eager or compile; bf16 autocast if asked); its timer and parameter count."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True  # picks the fastest convolution per shape, as tuned PyTorch code does
    model = torch_models.keras_twin(FLAGS.model).to(device).to(memory_format=torch.channels_last)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), 1e-3, fused=device == "cuda")  # the CPU default is foreach
    forward = torch.compile(model) if mode == "compile" else model
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    x_uint8 = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).long().to(device)

    def step():
        x = x_uint8.permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=FLAGS.precision == "bfloat16"):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return _timer(f"PyTorch {mode}", len(images), step, lambda loss: loss.item()), parameters


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import keras  # after flag parsing, so that --help is fast

    if FLAGS.threads:
        import tensorflow as tf
        import torch

        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
        torch.set_num_threads(FLAGS.threads)
        torch.set_num_interop_threads(FLAGS.threads)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, FLAGS.batch_size).astype(np.int32)
    modes = list(dict.fromkeys(FLAGS.torch))
    print(f"{FLAGS.model}, {FLAGS.image_size} px, batch {FLAGS.batch_size}, {FLAGS.precision}, "
          f"{FLAGS.threads or 'default'} threads, "
          f"Keras backend {keras.backend.backend()} ({FLAGS.keras_loop}), PyTorch {', '.join(modes)}, "
          f"{FLAGS.steps} steps x {FLAGS.repeats} alternating repeats", flush=True)
    time_keras, keras_parameters = keras_trainer(images, labels)
    sides = {"Keras": time_keras}
    for mode in list(modes):
        try:
            sides[f"PyTorch {mode}"], torch_parameters = torch_trainer(images, labels, mode)
        except Exception as error:  # torch.compile needs a compiler toolchain the host may lack: keep the others
            if mode != "compile":
                raise
            print(f"  PyTorch compile FAILED, left out: {type(error).__name__}: {str(error)[:300]}", flush=True)
            modes.remove(mode)
    print(f"  trainable parameters: Keras {keras_parameters:,}, PyTorch {torch_parameters:,}", flush=True)
    rates = {side: [] for side in sides}
    for repeat in range(FLAGS.repeats):
        for side, timer in sides.items():
            rates[side].append(timer())
        rows = ", ".join(f"{side} {values[-1]:.1f} img/s" for side, values in rates.items())
        print(f"  repeat {repeat + 1}: {rows}", flush=True)
    keras_rate = statistics.median(rates["Keras"])
    for mode in modes:  # the ratio: the median of each repeat's own, as load drifts between repeats
        ratios = [ours / theirs for ours, theirs in zip(rates["Keras"], rates[f"PyTorch {mode}"])]
        print(f"| {FLAGS.model} | {FLAGS.image_size} | {FLAGS.batch_size} | {FLAGS.precision} | "
              f"{keras.backend.backend()}, {FLAGS.keras_loop} | {keras_rate:.1f} | {mode} | "
              f"{statistics.median(rates[f'PyTorch {mode}']):.1f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")

if __name__ == "__main__":
    cli.start(main)
