"""``xray-report RUN [--gradcam_images=4] [--overlay_size=224]``: write ``RUN/report.html``.

One self-contained page for the run (see ``xray_tf.run_report``): settings, data and split counts,
training curves, each evaluated split's metrics with 95 % intervals, confusion matrix, ROC,
precision-recall and reliability figures, and Grad-CAM overlays of correct and wrong validation and
test images. It embeds every image and fetches nothing, so it opens offline in any browser. Run
``xray-evaluate --split=val`` (and ``--split=test``) first for the curves and the Grad-CAM grid.
"""

from __future__ import annotations

from absl import app, flags

from xray_tf import cli

flags.DEFINE_integer("gradcam_images", 4, "Grad-CAM overlays per true class of each of val and test: this many "
                     "correct and this many wrong images, the most confident ones (0: none).", lower_bound=0)
flags.DEFINE_integer("overlay_size", 224, "Side of each Grad-CAM picture in pixels, before its caption and colour "
                     "bar.", lower_bound=32)
FLAGS = flags.FLAGS


@cli.reports_errors("xray-report")
def run_command(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("Give one run directory: xray-report RUN.")
    with cli.tensorflow_quietly():
        from xray_tf import run_report
    print(f"Wrote {run_report.write_report(argv[1], FLAGS.gradcam_images, FLAGS.overlay_size)}")


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
