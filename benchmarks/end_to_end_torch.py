"""The paper's recipe in PyTorch: the other side of ``benchmarks/end_to_end.py``'s whole-run comparison.

It trains what ``python -m xray_tf.train`` trains, on the same work, with the tools a careful
PyTorch user reaches for:

- data: xray_tf's own index of ``--data_dir`` and its patient-grouped validation split, from the
  same ``TrainConfig`` (``flags/common_paper.cfg`` plus the flags after ``--``), so both sides see
  the same images in the same splits;
- input: every image decoded once with PIL (grey, resized to ``image_size``) by a DataLoader's
  workers into one uint8 array (as xray_tf's decode pass does), then per epoch a DataLoader on
  persistent workers over that array: ``WeightedRandomSampler`` (reciprocal-count weights), flips
  (p=0.5 each) and rotation (``rotation_prob``, ``rotation_degrees``, bilinear), pinned memory;
- model: ``benchmarks.torch_models.keras_twin`` (Keras' ResNet50 or DenseNet121 layer for layer,
  4-way head, random initial weights), channels-last, ``cudnn.benchmark``, bf16 autocast on a GPU
  (xray_tf's ``--mixed_precision=auto``), float32 on the CPU;
- recipe: cross-entropy, Adam (fused on a GPU) at ``learning_rate`` multiplied by ``lr_decay`` every
  ``lr_decay_epochs``, ``epochs`` epochs of the train split rounded up to whole batches (xray_tf's
  epoch), validation loss after each, the best epoch's weights kept;
- finish: the best weights written with ``torch.save`` and evaluated on the validation split.

It writes the seconds of each stage and each epoch as JSON to ``--report``; ``end_to_end.py
--torch_reference`` starts it in a fresh process and prints its row beside the Keras runs.

    python -m benchmarks.end_to_end_torch --data_dir=PATH/TO/CORONAHACK --output_dir=/tmp/runs \\
        --report=/tmp/runs/torch.json -- --epochs=2
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import numpy as np
from absl import flags

from xray_tf import cli

flags.DEFINE_string("model", "resnet50", "resnet50 or densenet121.")
flags.DEFINE_string("data_dir", None, "The CoronaHack folder.")
flags.DEFINE_string("output_dir", None, "Where the run's weights go.")
flags.DEFINE_string("report", None, "The JSON file the stage and epoch seconds go to.")
flags.DEFINE_integer("workers", min(os.cpu_count() or 1, 16), "DataLoader workers.")
flags.mark_flags_as_required(["data_dir", "output_dir", "report"])
FLAGS = flags.FLAGS


def recipe(extra_flags: list[str]):
    """The ``TrainConfig`` of the Keras side's run: the paper's flagfile, this data, then ``extra_flags``."""
    from xray_tf import config

    paper = os.path.join(config.FLAGS_DIR, "common_paper.cfg")
    return config.TrainConfig.from_args([f"--flagfile={paper}", f"--model={FLAGS.model}", "--weights=none",
                                         "--loss=ce", f"--data_dir={FLAGS.data_dir}", *extra_flags])


def decode_all(paths: list[str], image_size: int, workers: int) -> np.ndarray:
    """Every image decoded once, grey and resized, into one uint8 ``[N, S, S]`` array (DataLoader workers)."""
    import torch
    from PIL import Image

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            image = Image.open(paths[i]).convert("L").resize((image_size, image_size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(image).copy())

    images = np.empty((len(paths), image_size, image_size), np.uint8)
    done = 0
    for batch in torch.utils.data.DataLoader(Files(), batch_size=64, num_workers=workers):
        images[done:done + len(batch)] = batch.numpy()
        done += len(batch)
    return images


def loader(images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int, train: bool, settings):
    """Training batches (balanced sampler, flips, rotation) or evaluation batches in order, as uint8 ``[B,S,S]``."""
    import random

    import torch
    from PIL import Image

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            image = images[i]
            if train:  # Python's random module: the DataLoader reseeds it in every worker
                picture = Image.fromarray(image)
                if random.random() < 0.5:
                    picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
                if random.random() < 0.5:
                    picture = picture.transpose(Image.FLIP_TOP_BOTTOM)
                if random.random() < settings.rotation_prob:
                    angle = random.uniform(-settings.rotation_degrees, settings.rotation_degrees)
                    picture = picture.rotate(angle, resample=Image.BILINEAR)
                image = np.asarray(picture)
            return torch.from_numpy(image.copy()), int(labels[i])

    sampler = None
    if train:  # xray_tf's epoch: the train split rounded up to whole batches, all of them full
        steps = math.ceil(len(images) / batch_size)
        weights = 1.0 / np.bincount(labels)[labels]
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=steps * batch_size, replacement=True)
    return torch.utils.data.DataLoader(Images(), batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def main(argv: list[str]) -> None:
    import torch

    from benchmarks.torch_models import keras_twin
    from xray_tf import data

    settings = recipe(argv[1:])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    index = data.load_index(settings.data_dir, settings.task, settings.val_fraction, settings.seed,
                            split_by=settings.split_by)
    splits = {split: index.split(split) for split in ("train", "val")}
    start = time.perf_counter()
    images = {split: decode_all(list(rows["path"]), settings.image_size, FLAGS.workers)
              for split, rows in splits.items()}
    labels = {split: rows["label_index"].to_numpy() for split, rows in splits.items()}
    decode_seconds = time.perf_counter() - start

    model = keras_twin(FLAGS.model).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), settings.learning_rate, fused=device == "cuda")
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, settings.lr_decay_epochs, settings.lr_decay)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    bf16 = device == "cuda"

    def logits(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=True)[:, None].float().div(255).expand(-1, 3, -1, -1)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return model(x).float()

    def evaluate(batches) -> tuple[float, np.ndarray]:
        model.eval()
        losses, predictions = [], []
        with torch.no_grad():
            for batch, target in batches:
                out = logits(batch)
                losses.append(torch.nn.functional.cross_entropy(out, target.to(device), reduction="sum"))
                predictions.append(out.argmax(1))
        model.train()
        return float(torch.stack(losses).sum()) / len(labels["val"]), torch.cat(predictions).cpu().numpy()

    train_batches = loader(images["train"], labels["train"], settings.batch_size, FLAGS.workers, True, settings)
    val_batches = loader(images["val"], labels["val"], settings.batch_size, FLAGS.workers, False, settings)
    fit_start = time.perf_counter()
    epoch_seconds, val_losses, best = [], [], None
    for _ in range(settings.epochs):
        epoch_start = time.perf_counter()
        for batch, target in train_batches:
            loss = torch.nn.functional.cross_entropy(logits(batch), target.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        val_loss, _ = evaluate(val_batches)  # reading it waits for the epoch's last step
        if not val_losses or val_loss < min(val_losses):
            best = copy.deepcopy(model.state_dict())
        val_losses.append(val_loss)
        epoch_seconds.append(time.perf_counter() - epoch_start)
        print(f"epoch {len(epoch_seconds)}: {epoch_seconds[-1]:.2f} s, val loss {val_loss:.4f}", flush=True)
    fit_seconds = time.perf_counter() - fit_start

    finish_start = time.perf_counter()
    model.load_state_dict(best)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    torch.save(best, os.path.join(FLAGS.output_dir, f"torch_{FLAGS.model}.pt"))
    _, predictions = evaluate(val_batches)
    recalls = [np.mean(predictions[labels["val"] == label] == label) for label in np.unique(labels["val"])]
    finish_seconds = time.perf_counter() - finish_start
    with open(FLAGS.report, "w") as handle:
        json.dump({"seconds": {"decode_and_cache": decode_seconds, "fit": fit_seconds, "finish": finish_seconds},
                   "epoch_seconds": epoch_seconds, "val_loss": val_losses,
                   "val_balanced_accuracy": float(np.mean(recalls)), "device": device}, handle)


if __name__ == "__main__":
    cli.start(main)
