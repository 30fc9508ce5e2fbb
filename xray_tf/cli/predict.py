"""``xray-predict --model=RUN [--model=RUN2 ...] PATH...``: classify X-ray files with a trained model (or an
ensemble), optionally with Grad-CAM.

Examples::

    xray-predict --model=saved_models/demo scans/ > predictions.csv
    xray-predict --model=saved_models/demo/model.keras a.png b.jpeg --gradcam_dir=cams
    xray-predict --model=RUN --operating_point=COVID-19:sensitivity=0.95 --tta=flip scans/
    xray-predict --model=RUN_SEED0 --model=RUN_SEED1 scans/ --output=ensemble.csv

A PATH is an image file or a folder searched recursively for images. A file that cannot be read
(a FIFO, a symlink loop, more pixels than --max_pixels, not an image...) is reported by name with
the reason while every other file is still predicted; the exit status is 1 when any file failed,
0 otherwise. The CSV is written batch by batch, so when writing fails (a full disk) the rows
already written stay, and the program ends at once with one line naming what it could not write
(exit status 1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from absl import app, flags

from xray_tf import cli
from xray_tf.config import COMPILATION_CACHE_AUTO, DEFAULT_MAX_PIXELS, TTA_MODES, ConfigError

flags.DEFINE_multi_string("model", None, "Run directory of xray-train, SavedModel directory, .keras, .onnx or "
                          ".tflite file; several: predict with their ensemble (mean probabilities; same classes and "
                          "image size). Grad-CAM needs a run directory or a .keras file.",
                          required=True)
flags.DEFINE_string("output", None, "CSV file to write; default: standard output.")
flags.DEFINE_enum("tta", "none", list(TTA_MODES), "Test-time augmentation, averaged over the views: none; flip: the "
                  "image and its mirror image; flip_rotate: those and the image rotated by +-10 degrees.")
flags.DEFINE_bool("calibrated", True, "Apply the run's stored temperature (calibration.json of xray-evaluate "
                  "--calibrate); false: the model's own probabilities (refused for a calibrated run's SavedModel, "
                  "which has the temperature built in).")
flags.DEFINE_multi_string("operating_point", [], "CLASS:sensitivity=0.95 or CLASS:specificity=0.9, as stored in the "
                          "run by xray-evaluate --operating_point: adds a flag_<class> column, 1 where p_<class> is at "
                          "least that threshold (one model only; same --tta and calibration as when it was chosen).")
flags.DEFINE_string("gradcam_dir", None, "Folder for Grad-CAM overlay PNGs, one per image, captioned with the "
                    "predicted class and its probability (needs one Keras model: a run directory or .keras file; "
                    "refused for an ensemble, which no single heatmap explains).")
flags.DEFINE_string("gradcam_class", None, "Class explained by Grad-CAM, by name or index; default: each image's "
                    "predicted class.")
flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
flags.DEFINE_integer("overlay_size", 512, "Side of the square Grad-CAM overlays, in pixels.", lower_bound=1)
flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "Refuse, by name and before decoding, any image whose header "
                     "declares more pixels than this (a decoded 16-bit RGBA image costs 8 bytes a pixel).",
                     lower_bound=1)
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
        from xray_tf import compile_cache, predict, predictors, rundir
    predict.check_destinations(FLAGS.output, FLAGS.gradcam_dir)
    files = predict.find_images(argv[1:])
    compile_cache.enable(FLAGS.compilation_cache)
    loaded = predictors.load_ensemble(FLAGS.model, FLAGS.calibrated)
    class_names = loaded[0].class_names
    thresholds = predictors.operating_thresholds(loaded, FLAGS.operating_point, FLAGS.tta)
    target = None
    if FLAGS.gradcam_class is not None:
        target = predict.class_index(FLAGS.gradcam_class, class_names)
    for predictor in loaded:
        if predictor.temperature is not None:
            print(f"xray-predict: {predictor.name}: probabilities with the run's temperature "
                  f"{predictor.temperature:.4g} (--calibrated=false: the model's own)", file=sys.stderr)
    batches = predict.predict_batches(loaded, files, FLAGS.batch_size, FLAGS.gradcam_dir, target,
                                      FLAGS.overlay_size, FLAGS.max_pixels, FLAGS.tta)  # checks before writing
    name = FLAGS.output or "standard output"
    with rundir.writing(name, predict.CSV_FILE):
        output = open(FLAGS.output, "w", newline="", encoding="utf-8") if FLAGS.output \
            else contextlib.nullcontext(sys.stdout)
    results, progress = [], _progress_bar(sys.stderr)
    # Outside too: closing a file that failed to flush fails again, and must say the same.
    with rundir.writing(name, predict.CSV_FILE), output as stream:
        writer = predict.PredictionWriter(stream, class_names, FLAGS.gradcam_dir is not None, name, thresholds)
        for batch in batches:
            writer.write(batch)
            results += batch
            if progress is not None:
                progress(len(results), len(files))
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
