"""``xray-synthetic --out DIR``: write a synthetic stand-in for CoronaHack in the Kaggle layout.

For checking that the tooling works (tests, the demo), never for judging a model: see
``xray_tf.synthetic``.
"""

from __future__ import annotations

from absl import flags

from xray_tf import cli

flags.DEFINE_string("out", None, "Directory to create for the synthetic dataset.", required=True)
flags.DEFINE_integer("num_train", 400, "Number of TRAIN images (classes imbalanced like CoronaHack).")
flags.DEFINE_integer("num_test", 80, "Number of TEST images.")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes the same images.")
FLAGS = flags.FLAGS


@cli.reports_errors("xray-synthetic")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    from xray_tf import (
        synthetic,  # NumPy, pandas and PIL: after parsing, so --help is instant
    )

    path = synthetic.write_dataset(FLAGS.out, FLAGS.num_train, FLAGS.num_test, FLAGS.seed)
    print(f"Synthetic CoronaHack-layout dataset written to {path}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
