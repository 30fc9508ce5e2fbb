"""``python scripts/run_paper.py --results_dir=DIR --seeds=0,1,2 [--with_extra] [-- TRAIN FLAGS...]``

Reproduces the paper's experiments in one command: each flagfile ``flags/<name>.cfg`` of the six
Table 1 experiments (prce, prcw, prfl, pdcxce, pdcxfl, rce) is trained once per seed, each run is
evaluated, and the table and figures are written, all into one results directory::

    DIR/<name>_seed<S>/           a run directory (xray-train), evaluated on --evaluate_splits (as xray-evaluate)
    DIR/<name>_extra_seed<S>/     with --with_extra: the same plus --extra_data (the paper's Table 2)
    DIR/logs/<run>.log            the output of that run's commands
    DIR/table.md, .csv, _runs.csv scripts/results_table.py over every run
    DIR/figures/histories_[extra_]seed<S>.png    scripts/plot_histories.py, one figure per seed
    DIR/figures/figure1_*.png, figure2_*.png     scripts/explore_dataset.py on the data used

Train flags after ``--`` are appended after the flagfile and so override it, e.g. tiny settings::

    python scripts/run_paper.py --results_dir=/tmp/paper --seeds=0 -- \\
        --image_size=32 --epochs=1 --weights=none --chexnet_weights=chexnet32.weights.h5

Before the first run starts, everything that can be checked is: the flagfiles exist, every CheXNet
experiment has its --chexnet_weights file (or, with --skip_missing_chexnet, is skipped and listed),
every ImageNet experiment's weights are in Keras' cache or downloadable (models.check_weights_available),
and no earlier, unfinished run is in the way; --dry_run checks the same. A run whose directory already
holds metrics.json is not run again, so a sweep that was stopped continues where it stopped. The
flagfiles are the installed ones (``xray-train --experiment=NAME``) unless --flags_dir names others; a
relative --chexnet_weights is read from the working directory, as xray-train reads it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import subprocess
import sys
import time

from absl import app, flags

from xray_tf import cli, reports, rundir, synthetic
from xray_tf.config import COMPILATION_CACHE_AUTO, EVALUATION_SPLITS, FLAGS_DIR, ConfigError, TrainConfig

_RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Folder for every run, log, table and figure.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; each experiment is trained once per seed.")
_EXPERIMENTS = flags.DEFINE_list("experiments", list(reports.PAPER_EXPERIMENTS),
                                 "Flagfile names in --flags_dir to run (default: the paper's six).")
_FLAGS_DIR = flags.DEFINE_string("flags_dir", FLAGS_DIR, "Folder of <name>.cfg flagfiles (default: the installed "
                                 "ones, the repository's flags/).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "CoronaHack folder; omitted: the trainer's synthetic dataset.")
_EXTRA_DATA = flags.DEFINE_string("extra_data", None,
                                  "Extra COVID-19 images (metadata.csv, images/), for --with_extra.")
_WITH_EXTRA = flags.DEFINE_bool("with_extra", False, "Also run every experiment with --extra_data (Table 2).")
_EVALUATE_SPLITS = flags.DEFINE_list("evaluate_splits", ["val"], "Splits to evaluate each run on after it "
                                     "trained, as xray-evaluate does (val, test; empty for none).")
_SKIP_MISSING_CHEXNET = flags.DEFINE_bool("skip_missing_chexnet", False, "Skip (and list) the CheXNet experiments "
                                          "when their --chexnet_weights file is missing, instead of stopping.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan and the commands; run nothing.")

# Train flags that the sweep itself sets for every run; giving them after -- would be silently overridden.
_SWEEP_FLAGS = {"seed": "--seeds", "output_dir": "--results_dir", "run_name": "(set per run)",
                "data_dir": "--data_dir", "extra_data": "--extra_data"}


@dataclasses.dataclass
class Run:
    name: str
    seed: int
    extra: bool
    train_args: list[str]
    skip_reason: str | None = None


def plan_runs(overrides: list[str]) -> list[Run]:
    """Every run of the sweep, checked; raise ValueError listing whatever would stop it midway."""
    if _WITH_EXTRA.value and not _EXTRA_DATA.value:
        raise ValueError("--with_extra needs --extra_data=PATH (metadata.csv and images/).")
    for path_flag in (_DATA_DIR, _EXTRA_DATA):
        if path_flag.value and not os.path.isdir(path_flag.value):
            raise ValueError(f"--{path_flag.name}={path_flag.value!r} is not a directory.")
    try:
        seeds = [int(seed) for seed in _SEEDS.value]
    except ValueError:
        raise ValueError(f"--seeds={','.join(_SEEDS.value)}: expected comma-separated integers.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={','.join(_SEEDS.value)}: give each seed once.")
    unknown = [split for split in _EVALUATE_SPLITS.value if split not in EVALUATION_SPLITS]
    if unknown:
        raise ValueError(f"--evaluate_splits: {', '.join(unknown)} is not val or test.")
    bad = [arg for arg in overrides if not arg.startswith("--") or "=" not in arg]
    if bad:
        raise ValueError(f"Train flags after -- must be --name=value; got {' '.join(bad)}.")
    for arg in overrides:
        name = arg[2:].split("=", 1)[0]
        if name in _SWEEP_FLAGS:
            raise ValueError(f"Do not pass --{name} after --: the sweep sets it ({_SWEEP_FLAGS[name]}).")
    flagfiles = {name: os.path.join(os.path.abspath(_FLAGS_DIR.value), f"{name}.cfg") for name in _EXPERIMENTS.value}
    missing = [path for path in flagfiles.values() if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"No such flagfile(s): {', '.join(missing)}.")

    results_dir = os.path.abspath(_RESULTS_DIR.value)
    data_args = [f"--data_dir={os.path.abspath(_DATA_DIR.value)}"] if _DATA_DIR.value else []
    runs, problems = [], []
    imagenet_runs = collections.defaultdict(list)  # backbone -> the runs that will train from its ImageNet weights
    for seed in seeds:
        for extra in (False, True) if _WITH_EXTRA.value else (False,):
            for experiment, flagfile in flagfiles.items():
                name = f"{experiment}{reports.EXTRA_SUFFIX if extra else ''}_seed{seed}"
                extra_args = [f"--extra_data={os.path.abspath(_EXTRA_DATA.value)}"] if extra else []
                args = [f"--flagfile={flagfile}", *data_args, *extra_args, *overrides,
                        f"--seed={seed}", f"--output_dir={results_dir}", f"--run_name={name}"]
                run = Run(name, seed, extra, args)
                settings = TrainConfig.from_args(args)
                weights = settings.chexnet_weights
                if settings.model == "densenet_chexnet" and not (weights and os.path.isfile(weights)):
                    reason = f"--chexnet_weights={weights!r} is not a file (convert CheXNet: xray-convert-chexnet)"
                    if not _SKIP_MISSING_CHEXNET.value:
                        problems.append(f"{name}: {reason}; or pass --skip_missing_chexnet.")
                    run.skip_reason = reason
                run_dir = os.path.join(results_dir, name)
                if os.path.isdir(run_dir) and not rundir.is_finished(run_dir):
                    problems.append(f"{run_dir} exists but is unfinished (no {rundir.METRICS}): delete it to run "
                                    "again.")
                elif not (os.path.isdir(run_dir) or run.skip_reason) and settings.weights == "imagenet":
                    imagenet_runs[settings.model].append(name)  # a finished run needs no weights
                runs.append(run)
    problems += _imagenet_problems(imagenet_runs)
    if problems:
        raise ValueError("Nothing was run:\n  " + "\n  ".join(problems))
    return runs


def _imagenet_problems(runs_by_model: dict[str, list[str]]) -> list[str]:
    """One problem per backbone whose ImageNet weights Keras could neither find nor download, naming its runs.

    Checked once per backbone, not per run: every run of it reads the same cached file.
    """
    if not runs_by_model:
        return []  # and no TensorFlow to import
    with cli.tensorflow_quietly():
        from xray_tf import models
    problems = []
    for model, names in runs_by_model.items():
        try:
            models.check_weights_available(model, "imagenet")
        except ConfigError as error:
            problems.append(f"{', '.join(names)}: {error.as_flag()}")
    return problems


def _run_logged(command: list[str], log_path: str) -> None:
    """Run ``command``, appending its output to ``log_path``; raise RuntimeError with the log's tail on failure."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        raise _failure(f"{' '.join(command[:3])} ... failed (exit {returncode})", log_path)


def _failure(what: str, log_path: str) -> RuntimeError:
    """The error of a step that failed: ``what`` happened, and the last lines of its log."""
    with open(log_path) as log:
        tail = "".join(log.readlines()[-25:])
    return RuntimeError(f"{what}; end of {log_path}:\n{tail}")


def _evaluate_apart(run_dir: str, splits: list[str], log_path: str) -> None:
    """Evaluate ``run_dir`` on ``splits`` in one fresh process, its output appended to ``log_path``.

    A process of its own, as xray-evaluate's would be, so that no hold of TensorFlow or JAX on a GPU
    outlives it into the next run's training; one for all splits, so that TensorFlow loads once.
    """
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's state
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        try:
            pool.submit(_evaluate, run_dir, splits, log_path).result()
        except concurrent.futures.BrokenExecutor:  # the process died
            raise _failure(f"evaluating {run_dir} stopped abruptly (out of memory?)", log_path) from None


def _evaluate(run_dir: str, splits: list[str], log_path: str) -> None:
    """In the evaluating process: ``evaluate_run`` on each split; a failure is a RuntimeError naming run and split."""
    with open(log_path, "a") as log:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(log.fileno(), stream.fileno())  # TensorFlow's C++ output goes there too
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as xray-evaluate logs
    with cli.tensorflow_quietly():
        from xray_tf import compile_cache, evaluate
    compile_cache.enable(COMPILATION_CACHE_AUTO)  # xray-evaluate's default
    for split in splits:
        print(f"$ evaluate {run_dir} on {split} (the run's own data)", flush=True)
        try:
            result = evaluate.evaluate_run(run_dir, split)
        except (ValueError, OSError) as error:  # ConfigError too, which names its flag
            message = f"evaluating {run_dir} on {split}: {error.as_flag() if isinstance(error, ConfigError) else error}"
            print(message, file=sys.stderr, flush=True)  # the log says why, as xray-evaluate's would
            raise RuntimeError(message) from None
        print(f"{split}: {result['num_images']} images, accuracy {result['accuracy']:.3f}, balanced accuracy "
              f"{result['balanced_accuracy']:.3f}; wrote {rundir.metrics_of_split(split)} and its figures",
              flush=True)


def _work(run: Run, results_dir: str) -> tuple[bool, list[str]]:
    """Whether ``run`` still needs training, and the evaluations it still lacks (so a stopped sweep resumes)."""
    run_dir = os.path.join(results_dir, run.name)
    train = not os.path.isdir(run_dir)  # plan_runs refused unfinished run directories
    evaluated = {s for s in _EVALUATE_SPLITS.value if os.path.isfile(os.path.join(run_dir, rundir.metrics_of_split(s)))}
    splits = [s for s in _EVALUATE_SPLITS.value if train or s not in evaluated]
    return train, splits


def _script(name: str) -> list[str]:
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]


def main(argv: list[str]) -> None:
    overrides = argv[1:]
    try:
        runs = plan_runs(overrides)
    except (ValueError, OSError) as error:
        sys.exit(f"run_paper: error: {error}")
    results_dir = os.path.abspath(_RESULTS_DIR.value)
    work = {run.name: _work(run, results_dir) for run in runs if not run.skip_reason}
    todo = [run for run in runs if run.name in work and (work[run.name][0] or work[run.name][1])]
    for run in runs:
        if run.skip_reason:
            status = f"SKIPPED: {run.skip_reason}"
        elif work[run.name][0]:
            status = "to run"
        else:
            missing = work[run.name][1]
            status = f"trained already; to evaluate on {', '.join(missing)}" if missing else "done already"
        print(f"{run.name}: {status}")
        if _DRY_RUN.value and run.name in work and work[run.name][0]:
            print("  xray-train " + " ".join(run.train_args))
    if _DRY_RUN.value:
        return

    logs = os.path.join(results_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    try:
        for number, run in enumerate(todo, 1):
            start = time.perf_counter()
            train, splits = work[run.name]
            print(f"[{number}/{len(todo)}] {run.name}: {'training' if train else 'evaluating'}", flush=True)
            log_path = os.path.join(logs, f"{run.name}.log")
            if train:
                _run_logged([sys.executable, "-m", "xray_tf.train", *run.train_args], log_path)
            if splits:
                _evaluate_apart(os.path.join(results_dir, run.name), splits, log_path)
            print(f"[{number}/{len(todo)}] {run.name}: done in {time.perf_counter() - start:.0f} s", flush=True)

        finished = [r for r in runs if not r.skip_reason]
        if not finished:
            raise RuntimeError("Every experiment was skipped; no table or figures to make.")
        run_dirs = [os.path.join(results_dir, r.name) for r in finished]
        report_log = os.path.join(logs, "reports.log")
        _run_logged([*_script("results_table.py"), *run_dirs, f"--out={os.path.join(results_dir, 'table')}"],
                    report_log)
        figures = os.path.join(results_dir, "figures")
        for seed in sorted({r.seed for r in finished}):
            for extra in sorted({r.extra for r in finished}):
                group = [os.path.join(results_dir, r.name) for r in finished if r.seed == seed and r.extra == extra]
                name = f"histories_{'extra_' if extra else ''}seed{seed}.png"
                _run_logged([*_script("plot_histories.py"), *group, f"--out={os.path.join(figures, name)}"],
                            report_log)
        data_dir = os.path.abspath(_DATA_DIR.value) if _DATA_DIR.value else synthetic.default_dataset_dir()
        settings = TrainConfig.from_args(finished[0].train_args)  # the split of the first run, as training made it
        split_args = [f"--task={settings.task}", f"--val_fraction={settings.val_fraction}", f"--seed={settings.seed}"]
        _run_logged([*_script("explore_dataset.py"), f"--data_dir={data_dir}", *split_args, f"--out_dir={figures}"],
                    report_log)
    except RuntimeError as error:
        sys.exit(f"run_paper: error: {error}")
    skipped = [r.name for r in runs if r.skip_reason]
    if skipped:
        print(f"SKIPPED (no CheXNet weights): {', '.join(skipped)}")
    with open(os.path.join(results_dir, "table.md")) as handle:
        print(handle.read())
    print(f"Results in {results_dir}: table.md, table.csv, figures/, one folder per run.")


if __name__ == "__main__":
    app.run(main)
