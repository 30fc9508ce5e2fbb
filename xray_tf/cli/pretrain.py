"""``xray-pretrain`` (also ``python -m xray_tf.pretrain``): self-supervised pretraining on unlabeled X-rays.

Examples::

    xray-pretrain --images=PATH/TO/ARCHIVE --model=resnet50 --method=vicreg --epochs=100
    xray-pretrain --images=PATH/TO/CORONAHACK --images=PATH/TO/extra --image_size=64 --epochs=5
    xray-pretrain --flagfile=saved_models/RUN/flags.txt --resume   # continue a killed run
    xray-train --model=resnet50 --weights=saved_models/RUN/backbone.weights.h5 ...   # fine-tune it

The flags are ``PretrainConfig``'s fields (``xray_tf.pretrain_config``), generated from it.
"""

from __future__ import annotations

from absl import logging

from xray_tf import cli
from xray_tf.pretrain_config import PretrainConfig

cli.define_config_flags(PretrainConfig)


@cli.reports_errors("xray-pretrain")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    config = cli.config_from_flags(PretrainConfig)
    with cli.tensorflow_quietly():
        from xray_tf import pretraining
    try:
        result = pretraining.run(config)
    except (ValueError, FloatingPointError) as error:
        logging.error("%s", error)  # into the run's log as well as the exit message
        raise
    print(f"Run directory: {result.run_dir}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
