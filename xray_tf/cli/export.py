"""``xray-export RUN [--format=onnx,litert] [--output=DIR]`` (also ``python -m xray_tf.export``): export a run.

Writes the run's kept model (``model.keras``) as ``saved_model/`` (TensorFlow), ``model.onnx`` (ONNX
Runtime) or ``model.tflite`` (the LiteRT interpreter), into the run directory or ``--output``, and prints
each path written. Every export takes uint8 images ``[batch, H, W, 1 or 3]`` and returns class
probabilities, with the run's calibration temperature when it has one (see ``xray_tf.export``).

Examples::

    xray-export saved_models/demo --format=onnx
    xray-export saved_models/demo --format=onnx,litert --output=ship/
    KERAS_BACKEND=tensorflow xray-export RUN --format=litert   # LiteRT converts on TensorFlow only
"""

from __future__ import annotations

from absl import app, flags

from xray_tf import cli
from xray_tf.config import EXPORT_FORMATS, export_formats

flags.DEFINE_string("format", "onnx", f"Comma-separated formats: {', '.join(EXPORT_FORMATS)} (onnx and litert need "
                    "pip install 'xray_tf[export]').")
flags.DEFINE_string("output", None, "Folder to write the files into (and a copy of the run's classes.json); "
                    "default: the run directory.")
FLAGS = flags.FLAGS


@cli.reports_errors("xray-export")
def run_command(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("Give one run directory: xray-export RUN --format=onnx.")
    formats = export_formats(FLAGS.format, "format")
    with cli.tensorflow_quietly():
        from xray_tf import export
    for path in export.export_run(argv[1], formats, FLAGS.output):
        print(f"Wrote {path}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
