"""End to end: one whole ``python -m xray_tf.train`` run, its wall time split into where it went.

The run is started as a user would start it (a fresh process, imports included), with the paper's
recipe (``flags/common_paper.cfg``: 224 px, batch 32, 20 epochs) unless flags after ``--`` say
otherwise. Random initial weights (``--weights=none``): the time per step does not depend on them,
and no download is possible on the GPU host. Afterwards the script reads the run's
``metrics.json`` and ``history.csv`` and prints one Markdown table row:

- start-up: process start, imports, data index and model build (the wall time nothing else covers);
- input: decoding, checking and caching every image once (``seconds.decode_and_cache``);
- compile: the first epoch's time beyond the median epoch (tracing and XLA compilation of the
  train and validation steps);
- steps: every epoch at the median epoch's pace (training steps, validation, callbacks);
- finish: reloading the best checkpoint, SavedModel export and the final per-split evaluation.

    python scripts/bench_end_to_end.py --model=resnet50 --data_dir=PATH/TO/CORONAHACK
    python scripts/bench_end_to_end.py --model=densenet121 --data_dir=... -- --epochs=2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_run(model: str, data_dir: str, output_dir: str, extra_flags: list[str]) -> tuple[float, str]:
    """Run the trainer in a fresh process; return its wall time and run directory."""
    command = [sys.executable, "-m", "xray_tf.train", "--flagfile=flags/common_paper.cfg", f"--model={model}",
               "--weights=none", "--loss=ce", f"--data_dir={data_dir}", f"--output_dir={output_dir}",
               f"--run_name=bench_{model}", *extra_flags]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start, os.path.join(output_dir, f"bench_{model}")


def split_wall_time(wall: float, run_dir: str) -> dict[str, float]:
    """Where ``wall`` seconds went, from the run's own records (see the module docstring)."""
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        seconds = json.load(handle)["seconds"]
    with open(os.path.join(run_dir, "history.csv"), newline="") as handle:
        epochs = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
    typical = statistics.median(epochs)
    compile_seconds = max(epochs[0] - typical, 0.0)
    fit_outside_epochs = seconds["fit"] - sum(epochs)  # the loss/metric build before the first epoch
    return {
        "total": wall,
        "start-up": wall - seconds["decode_and_cache"] - seconds["fit"] - seconds["export_and_evaluate"],
        "input": seconds["decode_and_cache"],
        "compile": compile_seconds + fit_outside_epochs,
        "steps": sum(epochs) - compile_seconds,
        "finish": seconds["export_and_evaluate"],
        "epochs": len(epochs),
        "median_epoch": typical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="any --model of xray_tf.train")
    parser.add_argument("--data_dir", required=True, help="the CoronaHack folder")
    parser.add_argument("--output_dir", default=None, help="where the run directory goes (default: a temporary one)")
    parser.add_argument("extra_flags", nargs="*", help="more xray_tf.train flags, after --")
    args = parser.parse_args()

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_end_to_end_")
    wall, run_dir = time_run(args.model, args.data_dir, output_dir, args.extra_flags)
    parts = split_wall_time(wall, run_dir)
    print("| model | epochs | total s | start-up s | input s | compile s | steps s | finish s | median epoch s |")
    print(f"| {args.model} | {parts['epochs']} | {parts['total']:.1f} | {parts['start-up']:.1f} | {parts['input']:.1f} "
          f"| {parts['compile']:.1f} | {parts['steps']:.1f} | {parts['finish']:.1f} | {parts['median_epoch']:.2f} |")


if __name__ == "__main__":
    main()
