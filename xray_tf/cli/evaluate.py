"""``xray-evaluate --run_dir=RUN [--run_dir=RUN2 ...] [--split=test|val | --eval_data=DIR]``: measure kept models.

Writes ``metrics_<split>.json``, ``confusion_matrix_<split>.png``, ``roc_<split>.png``, ``pr_<split>.png``,
``reliability_<split>.png`` and ``predictions_<split>.csv`` into the run directory, or into
``--output_dir`` for an ensemble of several runs (see ``xray_tf.evaluate``). Examples::

    xray-evaluate --run_dir=RUN --split=val --calibrate --operating_point=COVID-19:sensitivity=0.95
    xray-evaluate --run_dir=RUN --split=test --data_dir=FULL_DOWNLOAD --tta=flip
    xray-evaluate --run_dir=RUN --eval_data=HOSPITAL_FOLDER
    xray-evaluate --run_dir=RUN_SEED0 --run_dir=RUN_SEED1 --output_dir=ensemble --split=test
"""

from __future__ import annotations

from absl import flags

from xray_tf import cli
from xray_tf.config import COMPILATION_CACHE_AUTO, EVALUATION_SPLITS, TTA_MODES, ConfigError

flags.DEFINE_multi_string("run_dir", None, "Run directory written by xray-train; several: evaluate their ensemble "
                          "(mean probabilities) and each member.", required=True)
flags.DEFINE_string("data_dir", None, "Dataset folder to evaluate on, its layout detected (default: the run's own "
                    "datasets, read as in training).")
flags.DEFINE_enum("split", "test", list(EVALUATION_SPLITS), "test: the TEST split (absent from the shared copy); "
                  "val: the run's validation split.")
flags.DEFINE_string("eval_data", None, "A labelled folder from elsewhere in any layout (a folder per class, "
                    "Kermany's, a CSV of path,label, or --extra_data's metadata.csv with images/), its labels mapped "
                    "as in training, evaluated whole as split 'eval' instead of --split.")
flags.DEFINE_string("output_dir", None, "Where the report goes (default: the run directory; needed for an ensemble).")
flags.DEFINE_enum("tta", "none", list(TTA_MODES), "Test-time augmentation, averaged over the views: none; flip: "
                  "the image and its mirror image; flip_rotate: those and the image rotated by +-10 degrees.")
flags.DEFINE_bool("calibrate", False, "First fit each run's softmax temperature on its validation split and store "
                  "it (calibration.json, and the run's SavedModel).")
flags.DEFINE_bool("calibrated", True, "Apply the run's stored temperature; false: the model's own probabilities.")
flags.DEFINE_multi_string("operating_point", [], "CLASS:sensitivity=0.95 or CLASS:specificity=0.9: choose that "
                          "class's threshold on the validation split, report the split's sensitivity and "
                          "specificity there, and store it in the run (operating_points.json) for xray-predict.")
flags.DEFINE_integer("batch_size", 32, "Images per prediction batch.")
flags.DEFINE_string("compilation_cache", COMPILATION_CACHE_AUTO, cli.COMPILATION_CACHE_HELP)
FLAGS = flags.FLAGS


@cli.reports_errors("xray-evaluate")
def run_command(argv: list[str]) -> None:
    cli.no_arguments(argv)
    if FLAGS.eval_data is not None and FLAGS["split"].present:
        raise ConfigError("split", FLAGS.split, "--eval_data is evaluated whole (as split eval); drop --split.")
    with cli.tensorflow_quietly():
        from xray_tf import compile_cache, evaluate, rundir
    compile_cache.enable(FLAGS.compilation_cache)
    split = evaluate.EVAL_DATA_SPLIT if FLAGS.eval_data is not None else FLAGS.split
    run_dirs = FLAGS.run_dir
    result = evaluate.evaluate_run(run_dirs[0] if len(run_dirs) == 1 else run_dirs, split, FLAGS.data_dir,
                                   FLAGS.batch_size, output_dir=FLAGS.output_dir, eval_data=FLAGS.eval_data,
                                   tta=FLAGS.tta, calibrated=FLAGS.calibrated, calibrate=FLAGS.calibrate,
                                   operating_points=FLAGS.operating_point)
    print(_summary(result))
    written = [rundir.metrics_of_split(split), rundir.confusion_matrix_png(split), rundir.roc_png(split),
               rundir.pr_png(split), rundir.reliability_png(split), rundir.predictions_of_split(split)]
    print(f"Wrote {', '.join(written)} in {FLAGS.output_dir or run_dirs[0]}")


def _summary(result: dict) -> str:
    """A few lines for the terminal; the JSON has everything."""
    def percent(value: float | None) -> str:
        return "undefined" if value is None else f"{100 * value:.1f}%"

    def interval(values: list[float] | None) -> str:
        return "" if values is None else f" [{100 * values[0]:.1f}, {100 * values[1]:.1f}]"

    ci95 = result.get("ci95", {})
    lines = [
        f"{result['split']}: {result['num_images']} images of {result['data_dir']}",
        f"  accuracy {percent(result['accuracy'])}{interval(ci95.get('accuracy'))}, balanced accuracy "
        f"{percent(result['balanced_accuracy'])}{interval(ci95.get('balanced_accuracy'))}, macro F1 "
        f"{percent(result['macro_f1'])}, macro ROC AUC {percent(result['macro_roc_auc'])}, "
        f"ECE {percent(result['calibration']['ece'])}",
    ]
    for name, stats in result["per_class"].items():
        lines.append(f"  {name:>10}: n={stats['support']:<4} sensitivity {percent(stats['recall'])}, "
                     f"specificity {percent(stats['specificity'])}, precision {percent(stats['precision'])}, "
                     f"ROC AUC {percent(stats['roc_auc'])}, called {percent(result['predicted_share'][name])}")
    if result["absent_classes"]:
        lines.append(f"  absent from this split: {', '.join(result['absent_classes'])}")
    for key, point in result.get("operating_points", {}).items():
        rates = point["rates"][result["split"]]
        lines.append(f"  {key}: threshold {point['threshold']:.4g} (chosen on val): sensitivity "
                     f"{percent(rates['sensitivity'])}{interval(rates['sensitivity_ci95'])}, specificity "
                     f"{percent(rates['specificity'])}{interval(rates['specificity_ci95'])}")
    for name, member in result.get("members", {}).items():
        lines.append(f"  member {name}: accuracy {percent(member['accuracy'])}, balanced accuracy "
                     f"{percent(member['balanced_accuracy'])}, macro ROC AUC {percent(member['macro_roc_auc'])}")
    if "paper_metric" in result:
        paper = result["paper_metric"]
        lines.append(f"  paper's metric, average accuracy over epochs ({paper['epochs']}): "
                     f"train {percent(paper['train'])}, val {percent(paper['val'])}")
    return "\n".join(lines)


def main() -> None:
    cli.start(run_command)


if __name__ == "__main__":
    main()
