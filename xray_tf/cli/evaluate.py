"""``xray-evaluate --run_dir=RUN [--data_dir=...] [--split=test|val]``: measure a run's kept model.

Writes ``metrics_<split>.json``, ``confusion_matrix_<split>.png``, ``roc_<split>.png`` and
``predictions_<split>.csv`` into the run directory (see ``xray_tf.evaluate``).
"""

from __future__ import annotations

from absl import flags

from xray_tf import cli
from xray_tf.config import COMPILATION_CACHE_AUTO, EVALUATION_SPLITS

flags.DEFINE_string("run_dir", None, "Run directory written by xray-train.", required=True)
flags.DEFINE_string("data_dir", None, "CoronaHack folder to evaluate on (default: the run's own).")
flags.DEFINE_enum("split", "test", list(EVALUATION_SPLITS), "test: the TEST split (absent from the shared copy); "
                  "val: the run's validation split.")
flags.DEFINE_integer("batch_size", 32, "Images per prediction batch.")
flags.DEFINE_string("compilation_cache", COMPILATION_CACHE_AUTO, cli.COMPILATION_CACHE_HELP)
FLAGS = flags.FLAGS


@cli.reports_errors("xray-evaluate")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    with cli.tensorflow_quietly():
        from xray_tf import compile_cache, evaluate, rundir
    compile_cache.enable(FLAGS.compilation_cache)
    result = evaluate.evaluate_run(FLAGS.run_dir, FLAGS.split, FLAGS.data_dir, FLAGS.batch_size)
    print(evaluate.summary(result))
    split = FLAGS.split
    print(f"Wrote {rundir.metrics_of_split(split)}, {rundir.confusion_matrix_png(split)}, {rundir.roc_png(split)} "
          f"and {rundir.predictions_of_split(split)} in {FLAGS.run_dir}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
