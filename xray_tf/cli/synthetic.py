"""``xray-synthetic --out DIR [--format=LAYOUT]``: write a synthetic stand-in for CoronaHack.

``--format`` picks the layout (``xray_tf.synthetic.LAYOUTS``); the same seed writes the same images
in every one.

For checking that the tooling works (tests, the demo), never for judging a model: see
``xray_tf.synthetic``.
"""

from __future__ import annotations

from absl import flags

from xray_tf import cli

flags.DEFINE_string("out", None, "Directory to create for the synthetic dataset.", required=True)
flags.DEFINE_integer("num_train", 400, "Number of TRAIN images (classes imbalanced like CoronaHack).")
flags.DEFINE_integer("num_test", 80, "Number of TEST images.")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes the same images, in every layout.")
# synthetic.LAYOUTS, spelled out because importing it here would slow --help (tests keep them equal).
flags.DEFINE_enum("format", "coronahack", ["coronahack", "kermany", "folders", "csv"],
                  "Layout to write: coronahack (Kaggle's CSV and split folders, with two Stress-Smoking rows), "
                  "kermany (Kermany et al.'s {train,val,test}/{NORMAL,PNEUMONIA}/, patients in the file names, "
                  "no COVID-19), folders ({train,test}/<class>/) or csv (labels.csv with path,label,split,"
                  "patient_id beside images/).")
FLAGS = flags.FLAGS


@cli.reports_errors("xray-synthetic")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    from xray_tf import (
        synthetic,  # NumPy, pandas and PIL: after parsing, so --help is instant
    )

    path = synthetic.write_dataset(FLAGS.out, FLAGS.num_train, FLAGS.num_test, FLAGS.seed, layout=FLAGS.format)
    print(f"Synthetic dataset in the {FLAGS.format} layout written to {path}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
