"""``xray-compare RUN_A RUN_B [--data_dir=DATA] [--split=test] [--out=PREFIX]``: is run A better than run B?

Evaluates both runs' kept models on the same images (writing each run's ``metrics_<split>.json``
and ``predictions_<split>.csv``, as ``xray-evaluate`` does), then prints a Markdown table of every
metric of A and B, the difference A - B and its paired bootstrap 95 % interval, and the exact
McNemar p-value for accuracy. ``--out=PREFIX`` also writes the table to ``PREFIX.md`` and every
number to ``PREFIX.json``; without it nothing else is written. Runs of different tasks, class
lists or images (validation splits drawn with other seeds) are refused. See ``xray_tf.comparison``.
"""

from __future__ import annotations

import os

from absl import app, flags

from xray_tf import cli
from xray_tf.config import COMPILATION_CACHE_AUTO, EVALUATION_SPLITS, ConfigError

flags.DEFINE_string("data_dir", None, "Dataset folder both runs are evaluated on (default: each run's own; "
                    "give one when their data folders differ).")
flags.DEFINE_enum("split", "test", list(EVALUATION_SPLITS), "test: the TEST split, the same for every run; val: "
                  "the runs' validation split, comparable only when both drew it with the same settings.")
flags.DEFINE_integer("batch_size", 32, "Images per prediction batch.", lower_bound=1)
flags.DEFINE_string("out", None, "Output prefix: writes PREFIX.json and PREFIX.md (default: print only).")
flags.DEFINE_integer("resamples", 2000, "Bootstrap resamples of the paired intervals.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.")
flags.DEFINE_string("compilation_cache", COMPILATION_CACHE_AUTO, cli.COMPILATION_CACHE_HELP)
FLAGS = flags.FLAGS


@cli.reports_errors("xray-compare")
def run_command(argv: list[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError("Name exactly two run directories: RUN_A RUN_B.")
    if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
        raise ConfigError("out", FLAGS.out, "its folder does not exist.")  # before the runs are evaluated
    with cli.tensorflow_quietly():
        from xray_tf import comparison, compile_cache
    compile_cache.enable(FLAGS.compilation_cache)
    result = comparison.compare_runs(argv[1], argv[2], FLAGS.split, FLAGS.data_dir, FLAGS.batch_size,
                                     resamples=FLAGS.resamples, seed=FLAGS.seed)
    print(comparison.markdown(result), end="")
    if FLAGS.out:
        json_path, markdown_path = comparison.write_comparison(result, FLAGS.out)
        print(f"Wrote {json_path} and {markdown_path}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
