"""End to end: one whole training run, its wall time split into where it went.

The run is started as a user would start it, in a fresh process (imports included): this script
starts itself again with ``--child_report``, and that process calls ``xray_tf.training.run`` with
the paper's recipe (``flags/common_paper.cfg``: 224 px, batch 32, 20 epochs) unless train flags
after ``--`` say otherwise. Random initial weights (``--weights=none``): the time per step does
not depend on them, and no download is possible on the GPU host. Afterwards the script reads the
run's ``metrics.json`` and ``history.csv`` and what the run's ``timing.FitClock`` recorded, prints
the history and one Markdown table row:

- start-up: process start, imports, data index and model build (the wall time nothing else covers);
- input: decoding, checking and caching every image once (``seconds.decode_and_cache``);
- compile: the first epoch's time beyond the median epoch (tracing and XLA compilation of the
  train and validation steps) and fit's time before its first epoch (building the evaluation step);
- steps: every epoch at the median epoch's pace (training steps, validation, callbacks, backups);
- after fit: from the end of the last epoch until ``fit`` returns (waiting for the last backup, Keras'
  teardown);
- finish: writing ``model.keras`` from the best epoch's backup, SavedModel export and the final
  per-split evaluation.

What is measured where: the run times its own stages in ``metrics.json`` (``fit``: from just
before its ``fit`` call to just after). The child passes ``training.run`` a ``timing.FitClock``,
which ``fit`` calls after the run's own callbacks: it notes when the first epoch began and when
the last ended, the run's callbacks done with it (history row, backup handed to its writer). The
child reports the seconds between the two ("training") and from the last epoch's end until
``training.run`` returned. "after fit" is the latter less ``export_and_evaluate``, so it also
holds the milliseconds of bookkeeping ``training.run`` does between ``fit`` and the export and
after the evaluation (writing ``metrics.json``, removing the backups); "compile"'s part before
the first epoch, ``fit`` less "training" less "after fit", lacks them.

The first run compiles into an empty ``--compilation_cache`` (a cold start, whatever the user's
own cache holds); ``--warm_rerun`` then repeats the same run with that cache filled, which is
what every later run of the same model and shapes costs on the JAX backend. ``--torch_reference``
then runs the same recipe in PyTorch (``benchmarks/end_to_end_torch.py``) in a fresh process too,
timed the same way, and prints its row beside them: both sides on one machine in one call.

    python -m benchmarks.end_to_end --model=resnet50 --data_dir=PATH/TO/CORONAHACK --warm_rerun --torch_reference
    python -m benchmarks.end_to_end --model=densenet121 --data_dir=... -- --epochs=2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from xray_tf import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("model", "resnet50", "The model to train (a TrainConfig.model).")
flags.DEFINE_string("data_dir", None, "The CoronaHack folder.")
flags.DEFINE_string("output_dir", None, "Where the run directories go (default: a temporary one).")
flags.DEFINE_bool("warm_rerun", False, "Run a second time with the compilation cache the first run filled.")
flags.DEFINE_bool("torch_reference", False, "Then run the recipe in PyTorch (benchmarks/end_to_end_torch.py).")
flags.DEFINE_string("child_report", None, "Set by this script for the process it starts: train in this process "
                    "and write the run directory and the FitClock split of training.run's time to this JSON file.")
flags.mark_flag_as_required("data_dir")
FLAGS = flags.FLAGS


def train_and_report(extra_flags: list[str], report_path: str) -> None:
    """In the child: one training run as the module docstring says, its FitClock split written as JSON."""
    from benchmarks import timing
    from xray_tf import config, training

    recipe = os.path.join(config.FLAGS_DIR, "common_paper.cfg")
    own = [f"--model={FLAGS.model}", "--weights=none", "--loss=ce", f"--data_dir={FLAGS.data_dir}",
           f"--output_dir={FLAGS.output_dir}"]
    run_config = config.TrainConfig.from_args([f"--flagfile={recipe}", *own, *extra_flags])  # later flags win
    clock = timing.FitClock()
    start = time.perf_counter()
    run_dir = training.run(run_config, callbacks=[clock])
    end = time.perf_counter()
    with open(report_path, "w") as handle:
        json.dump({"run_dir": run_dir, **clock.split(start, end)}, handle)


def time_run(output_dir: str, run_name: str, cache_dir: str, extra_flags: list[str]) -> tuple[float, dict]:
    """Train in a fresh process of this script; return its wall time and its report."""
    report_path = os.path.join(output_dir, f"{run_name}_fit_clock.json")
    command = [sys.executable, "-m", "benchmarks.end_to_end", f"--child_report={report_path}",
               f"--model={FLAGS.model}", f"--data_dir={FLAGS.data_dir}", f"--output_dir={output_dir}", "--",
               f"--run_name={run_name}", f"--compilation_cache={cache_dir}", *extra_flags]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    wall = time.perf_counter() - start
    with open(report_path) as handle:
        return wall, json.load(handle)


def time_torch_run(output_dir: str, extra_flags: list[str]) -> dict[str, float]:
    """The PyTorch recipe in a fresh process; its wall time split like ``split_wall_time``'s."""
    report_path = os.path.join(output_dir, f"torch_{FLAGS.model}_report.json")
    command = [sys.executable, "-m", "benchmarks.end_to_end_torch", f"--model={FLAGS.model}",
               f"--data_dir={FLAGS.data_dir}", f"--output_dir={output_dir}", f"--report={report_path}", "--",
               *extra_flags]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    wall = time.perf_counter() - start
    with open(report_path) as handle:
        report = json.load(handle)
    seconds, epochs = report["seconds"], report["epoch_seconds"]
    typical = statistics.median(epochs)
    first_epoch_extra = max(epochs[0] - typical, 0.0)  # cuDNN's autotuning and the workers' start
    print(f"PyTorch val balanced accuracy {report['val_balanced_accuracy']:.3f}", flush=True)
    return {"total": wall, "start-up": wall - seconds["decode_and_cache"] - seconds["fit"] - seconds["finish"],
            "input": seconds["decode_and_cache"], "compile": first_epoch_extra,
            "steps": seconds["fit"] - first_epoch_extra, "after fit": 0.0, "finish": seconds["finish"],
            "epochs": len(epochs), "median_epoch": typical}


def table_row(side: str, parts: dict[str, float]) -> str:
    return (f"| {FLAGS.model} | {side} | {parts['epochs']} | {parts['total']:.1f} | {parts['start-up']:.1f} "
            f"| {parts['input']:.1f} | {parts['compile']:.1f} | {parts['steps']:.1f} | {parts['after fit']:.1f} "
            f"| {parts['finish']:.1f} | {parts['median_epoch']:.2f} |")


def split_wall_time(wall: float, report: dict) -> dict[str, float]:
    """Where ``wall`` seconds went, from the run's own records and the child's report (module docstring)."""
    from xray_tf import rundir

    seconds = rundir.read_metrics(report["run_dir"])["seconds"]
    epochs = rundir.read_history(report["run_dir"])["epoch_seconds"].tolist()
    typical = statistics.median(epochs)
    first_epoch_extra = max(epochs[0] - typical, 0.0)
    after_fit = report["after_last_epoch"] - seconds["export_and_evaluate"]
    return {
        "total": wall,
        "start-up": wall - seconds["decode_and_cache"] - seconds["fit"] - seconds["export_and_evaluate"],
        "input": seconds["decode_and_cache"],
        "compile": first_epoch_extra + seconds["fit"] - report["training"] - after_fit,
        "steps": report["training"] - first_epoch_extra,  # the backup after each epoch included
        "after fit": after_fit,
        "finish": seconds["export_and_evaluate"],
        "epochs": len(epochs),
        "median_epoch": typical,
    }


def main(argv: list[str]) -> None:
    if FLAGS.child_report:
        train_and_report(argv[1:], FLAGS.child_report)
        return
    from xray_tf import rundir

    output_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix="bench_end_to_end_")
    os.makedirs(output_dir, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix="compilation_cache_", dir=output_dir)  # empty: the first run is cold
    rows = []
    for cache in ("cold", "warm") if FLAGS.warm_rerun else ("cold",):
        wall, report = time_run(output_dir, f"bench_{FLAGS.model}_{cache}", cache_dir, argv[1:])
        parts = split_wall_time(wall, report)
        print(rundir.read_history(report["run_dir"]).to_csv(index=False), flush=True)  # the epochs, into the log
        rows.append(table_row(f"Keras, {cache} compilation cache", parts))
    if FLAGS.torch_reference:
        rows.append(table_row("PyTorch", time_torch_run(output_dir, argv[1:])))
    print("| model | side | epochs | total s | start-up s | input s | compile s | steps s | after fit s "
          "| finish s | median epoch s |")
    print("\n".join(rows))


if __name__ == "__main__":
    cli.start(main)
