"""``xray-train`` (also ``python -m xray_tf.train``): train a chest X-ray classifier, write a run directory.

Examples::

    xray-train --experiment=demo                               # synthetic data, minutes on CPU
    xray-train --experiment=pdcxfl --data_dir=PATH/TO/CORONAHACK
    xray-train --flagfile=flags/prfl.cfg --data_dir=PATH/TO/CORONAHACK
    xray-train --data_dir=PATH/TO/CORONAHACK --check_data     # check every file, train nothing
    xray-train --data_dir=PATH/TO/chest_xray --data_dir=MY_FOLDERS  # Kermany's layout and a folder per class
    xray-train --flagfile=saved_models/RUN/flags.txt --resume  # continue a killed run

The flags are ``TrainConfig``'s fields (``xray_tf.config``), generated from it.
"""

from __future__ import annotations

import sys

from absl import flags, logging

from xray_tf import cli
from xray_tf.config import EXPERIMENTS, TrainConfig

cli.define_config_flags(TrainConfig)
flags.DEFINE_string("experiment", None, f"Read the installed flagfile of an experiment ({', '.join(EXPERIMENTS)}) "
                    "in its place; later flags override it.")
flags.DEFINE_bool("check_data", False, "Only check the data: read the metadata, decode every image once, report "
                  "every problem and exit (status 0: no problem, 1: problems). Trains nothing, writes nothing.")
FLAGS = flags.FLAGS


@cli.reports_errors("xray-train")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    config = cli.config_from_flags(TrainConfig)
    with cli.tensorflow_quietly():
        from xray_tf import preflight, training
    try:
        if FLAGS.check_data:  # problems that stop training raise; skipped images are listed
            prepared = preflight.prepare_data(config, keep_images=False)  # a check keeps nothing
            print(preflight.check_report(prepared, config.task))
            sys.exit(1 if prepared.skipped else 0)
        run_dir = training.run(config)
    except (ValueError, FloatingPointError) as error:
        logging.error("%s", error)  # into the run's log as well as the exit message
        raise
    if run_dir is None:
        print("Training finished on this worker; the chief worker wrote the run directory.")
    else:
        print(f"Run directory: {run_dir}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
