"""``xray-convert-chexnet --input model.pth.tar --output chexnet_densenet121.weights.h5``.

Converts CheXNet's PyTorch checkpoint (arnoweng/CheXNet) into Keras weights of
``xray_tf.chexnet.build_chexnet``, exactly or not at all; needs no PyTorch (only ``--allow_pickle`` does).
"""

from __future__ import annotations

from absl import flags

from xray_tf import cli

flags.DEFINE_string("input", None, "PyTorch checkpoint, e.g. CheXNet's model.pth.tar.", required=True)
flags.DEFINE_string("output", None, "Keras weights file to write, ending in .weights.h5.", required=True)
flags.DEFINE_bool("allow_pickle", False, "Fully unpickle a checkpoint that holds more than tensors. This executes "
                  "code from the file: only for checkpoints from a trusted source.")
FLAGS = flags.FLAGS


@cli.reports_errors("xray-convert-chexnet")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    with cli.tensorflow_quietly():
        from xray_tf import chexnet
    chexnet.convert_checkpoint(FLAGS.input, FLAGS.output, allow_pickle=FLAGS.allow_pickle)
    print(f"Wrote {FLAGS.output} (Keras CheXNet, {len(chexnet.CHEXNET_CLASSES)} classes).")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
