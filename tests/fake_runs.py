"""Hand-made run directories: the files a run leaves, with chosen numbers, for the table and figure tests."""

from __future__ import annotations

import json
import os

import pandas as pd


def make_run(root, name: str, seed: int, accuracies: dict, epochs_accuracy=(0.5, 0.7), flags: dict | None = None,
             extra_files: dict | None = None) -> str:
    """A hand-made run directory: flags.txt, metrics.json with the given split accuracies, history.csv."""
    run_dir = os.path.join(str(root), name)
    os.makedirs(run_dir)
    settings = {"task": "four_class", "image_size": "32", "model": "resnet50", "seed": str(seed),
                "run_name": name, "output_dir": str(root), **(flags or {})}
    with open(os.path.join(run_dir, "flags.txt"), "w") as handle:
        handle.write("".join(f"--{k}={v}\n" for k, v in settings.items()))
    splits = {split: {"accuracy": value, "balanced_accuracy": value / 2, "macro_f1": value / 4}
              for split, value in accuracies.items()}
    with open(os.path.join(run_dir, "metrics.json"), "w") as handle:
        json.dump({"splits": splits}, handle)
    for file_name, payload in (extra_files or {}).items():
        with open(os.path.join(run_dir, file_name), "w") as handle:
            json.dump(payload, handle)
    pd.DataFrame({"epoch": range(1, len(epochs_accuracy) + 1), "loss": 1.0, "accuracy": epochs_accuracy,
                  "val_loss": 1.2, "val_accuracy": [a - 0.1 for a in epochs_accuracy]}).to_csv(
        os.path.join(run_dir, "history.csv"), index=False)
    return run_dir
