"""End to end: one whole ``python -m xray_tf.train`` run, its wall time split into where it went.

The run is started as a user would start it (a fresh process, imports included), with the paper's
recipe (``flags/common_paper.cfg``: 224 px, batch 32, 20 epochs) unless flags after ``--`` say
otherwise. Random initial weights (``--weights=none``): the time per step does not depend on them,
and no download is possible on the GPU host. Afterwards the script reads the run's
``metrics.json`` and ``history.csv``, prints the history and one Markdown table row:

- start-up: process start, imports, data index and model build (the wall time nothing else covers);
- input: decoding, checking and caching every image once (``seconds.decode_and_cache``);
- compile: the first epoch's time beyond the median epoch (tracing and XLA compilation of the
  train and validation steps) and fit's time before its first epoch (building the evaluation step);
- steps: every epoch at the median epoch's pace (training steps, validation, callbacks, backups);
- after fit: from the end of the last epoch until ``fit`` returns (Keras' teardown);
- finish: writing ``model.keras`` from the best epoch's backup, SavedModel export and the final
  per-split evaluation.

The first run compiles into an empty ``--compilation_cache`` (a cold start, whatever the user's
own cache holds); ``--warm_rerun`` then repeats the same run with that cache filled, which is
what every later run of the same model and shapes costs on the JAX backend.

    python scripts/bench_end_to_end.py --model=resnet50 --data_dir=PATH/TO/CORONAHACK --warm_rerun
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


def time_run(model: str, data_dir: str, output_dir: str, run_name: str, cache_dir: str,
             extra_flags: list[str]) -> tuple[float, str]:
    """Run the trainer in a fresh process; return its wall time and run directory."""
    command = [sys.executable, "-m", "xray_tf.train", "--flagfile=flags/common_paper.cfg", f"--model={model}",
               "--weights=none", "--loss=ce", f"--data_dir={data_dir}", f"--output_dir={output_dir}",
               f"--run_name={run_name}", f"--compilation_cache={cache_dir}", *extra_flags]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start, os.path.join(output_dir, run_name)


def split_wall_time(wall: float, run_dir: str) -> dict[str, float]:
    """Where ``wall`` seconds went, from the run's own records (see the module docstring)."""
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        seconds = json.load(handle)["seconds"]
    with open(os.path.join(run_dir, "history.csv"), newline="") as handle:
        epochs = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
    typical = statistics.median(epochs)
    first_epoch_extra = max(epochs[0] - typical, 0.0)
    # What fit spent outside history.csv's epochs besides its start and end: the backup after each epoch.
    between_epochs = (seconds["fit"] - sum(epochs) - seconds["fit_before_first_epoch"]
                      - seconds["fit_after_last_epoch"])
    return {
        "total": wall,
        "start-up": wall - seconds["decode_and_cache"] - seconds["fit"] - seconds["export_and_evaluate"],
        "input": seconds["decode_and_cache"],
        "compile": first_epoch_extra + seconds["fit_before_first_epoch"],
        "steps": sum(epochs) - first_epoch_extra + between_epochs,
        "after fit": seconds["fit_after_last_epoch"],
        "finish": seconds["export_and_evaluate"],
        "epochs": len(epochs),
        "median_epoch": typical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="any --model of xray_tf.train")
    parser.add_argument("--data_dir", required=True, help="the CoronaHack folder")
    parser.add_argument("--output_dir", default=None, help="where the run directories go (default: a temporary one)")
    parser.add_argument("--warm_rerun", action="store_true",
                        help="run a second time with the compilation cache the first run filled")
    parser.add_argument("extra_flags", nargs="*", help="more xray_tf.train flags, after --")
    args = parser.parse_args()

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_end_to_end_")
    os.makedirs(output_dir, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix="compilation_cache_", dir=output_dir)  # empty: the first run is cold
    rows = []
    for cache in ("cold", "warm") if args.warm_rerun else ("cold",):
        wall, run_dir = time_run(args.model, args.data_dir, output_dir, f"bench_{args.model}_{cache}", cache_dir,
                                 args.extra_flags)
        parts = split_wall_time(wall, run_dir)
        with open(os.path.join(run_dir, "history.csv")) as handle:  # the per-epoch record, into the log
            print(handle.read(), flush=True)
        rows.append(f"| {args.model} | {cache} | {parts['epochs']} | {parts['total']:.1f} | {parts['start-up']:.1f} "
                    f"| {parts['input']:.1f} | {parts['compile']:.1f} | {parts['steps']:.1f} | {parts['after fit']:.1f} "
                    f"| {parts['finish']:.1f} | {parts['median_epoch']:.2f} |")
    print("| model | compilation cache | epochs | total s | start-up s | input s | compile s | steps s | after fit s "
          "| finish s | median epoch s |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
