"""``xray-predict --model=RUN PATH...``: classify X-ray files with a trained model, optionally with Grad-CAM.

Examples::

    xray-predict --model=saved_models/demo scans/ > predictions.csv
    xray-predict --model=saved_models/demo/model.keras a.png b.jpeg --gradcam_dir=cams

A PATH is an image file or a folder searched recursively for images. A file that cannot be read
is reported by name with the reason while every other file is still predicted; the exit status
is 1 when any file failed, 0 otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from absl import app, flags

from xray_tf import cli
from xray_tf.config import COMPILATION_CACHE_AUTO, ConfigError

flags.DEFINE_string("model", None, "Run directory of xray-train, SavedModel directory or .keras file.", required=True)
flags.DEFINE_string("output", None, "CSV file to write; default: standard output.")
flags.DEFINE_string("gradcam_dir", None, "Folder for Grad-CAM overlay PNGs, one per image (needs the Keras model: "
                    "a run directory or .keras file).")
flags.DEFINE_string("gradcam_class", None, "Class explained by Grad-CAM, by name or index; default: each image's "
                    "predicted class.")
flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
flags.DEFINE_integer("overlay_size", 512, "Side of the square Grad-CAM overlays, in pixels.", lower_bound=1)
flags.DEFINE_string("compilation_cache", COMPILATION_CACHE_AUTO, cli.COMPILATION_CACHE_HELP)
FLAGS = flags.FLAGS


def _progress_bar(stream: TextIO) -> Callable[[int, int], None] | None:
    """A bar redrawn in place on ``stream`` (stderr: stdout may carry the CSV); none off a terminal."""
    if not stream.isatty():
        return None
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        filled = 30 * done // total
        rate = done / max(time.perf_counter() - start, 1e-9)
        stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} files, {rate:.1f} files/s")
        stream.write("\n" if done == total else "")
        stream.flush()

    return show


@cli.reports_errors("xray-predict")
def run_command(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("Name at least one image file or folder to classify.")
    if FLAGS.output and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output))):
        raise ConfigError("output", FLAGS.output, "its folder does not exist.")
    if FLAGS.gradcam_class is not None and FLAGS.gradcam_dir is None:
        raise ConfigError("gradcam_class", FLAGS.gradcam_class, "needs --gradcam_dir, where the overlays go.")
    with cli.tensorflow_quietly():
        from xray_tf import compile_cache, predict, rundir
    files = predict.find_images(argv[1:])
    compile_cache.enable(FLAGS.compilation_cache)
    predictor = predict.load_predictor(FLAGS.model)
    target = None
    if FLAGS.gradcam_class is not None:
        target = predict.class_index(FLAGS.gradcam_class, predictor.class_names)
    results = predict.predict_files(predictor, files, FLAGS.batch_size, FLAGS.gradcam_dir, target,
                                    FLAGS.overlay_size, _progress_bar(sys.stderr))
    text = predict.to_csv(results, predictor.class_names, with_gradcam=FLAGS.gradcam_dir is not None)
    if FLAGS.output:
        rundir.write_text(FLAGS.output, text)
    else:
        sys.stdout.write(text)
    failed = [result for result in results if result.error]
    print(f"xray-predict: {len(results) - len(failed)} of {len(results)} files predicted"
          + (f"; {len(failed)} could not be read:" if failed else "."), file=sys.stderr)
    for result in failed:
        print(f"  {result.file}: {result.error}", file=sys.stderr)
    sys.exit(1 if failed else 0)


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
