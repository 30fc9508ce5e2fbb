"""``xray-report`` (``xray_tf.run_report``): one self-contained page whose every image is an inline PNG.

The run directory is hand-made: the files a finished, evaluated run leaves (flags, metrics with
intervals, history with per-class recalls, val predictions of real image files) and an untrained
tiny model shaped like ``models.build_model``'s, so Grad-CAM runs in a second.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import keras
import numpy as np
import pandas as pd
import pytest
from fake_runs import make_run
from PIL import Image

from xray_tf import calibration, metrics, models, run_report, rundir, synthetic
from xray_tf.config import ConfigError

CLASSES = ["Normal", "Bacteria", "Virus"]
SIZE = 32
PER_GROUP = 2
CONFUSION_PNG_SIZE = (7, 5)  # the run's own confusion matrix PNG, told apart from a drawn one by its size
BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "headless_shell", "google-chrome")


def tiny_model() -> keras.Model:
    """uint8 [B, 32, 32, 1] -> 3 classes: preprocessing, a nested one-layer backbone, pooling, Dense softmax."""
    keras.utils.set_random_seed(0)
    backbone_input = keras.Input((SIZE, SIZE, 3))
    backbone = keras.Model(backbone_input, keras.layers.Conv2D(4, 4, strides=4, activation="relu")(backbone_input),
                           name="tiny_backbone")
    inputs = keras.Input((SIZE, SIZE, None), dtype="uint8", name="image")
    x = models.XrayPreprocessing("torch", name="preprocessing")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone(x))
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x))


def val_predictions(image_dir: str) -> pd.DataFrame:
    """Per class four images, three predicted right and one wrong, and a Normal file that is gone.

    The vanished file is the surest wrong Normal prediction, so the grid must say it cannot be read.
    """
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(CLASSES):
        for k in range(4):
            path = os.path.join(image_dir, f"{name.lower()}-{k}.png")
            Image.fromarray((255 * synthetic.draw_xray(name, 48, rng)).astype(np.uint8)).save(path)
            predicted = c if k < 3 else (c + 1) % len(CLASSES)
            rows.append((path, c, predicted, 0.5 + 0.1 * k))
    rows.append((os.path.join(image_dir, "gone.png"), 0, 2, 0.95))
    probabilities = np.zeros((len(rows), len(CLASSES)))
    for i, (_, _, predicted, confidence) in enumerate(rows):
        probabilities[i] = (1 - confidence) / (len(CLASSES) - 1)
        probabilities[i, predicted] = confidence
    frame = pd.DataFrame({"file": [r[0] for r in rows], "true_class": [CLASSES[r[1]] for r in rows],
                          "predicted_class": [CLASSES[r[2]] for r in rows]})
    for i, name in enumerate(CLASSES):
        frame[f"p_{metrics.metric_suffix(name)}"] = probabilities[:, i]
    return frame


@pytest.fixture(scope="module")
def report_run(tmp_path_factory) -> tuple[str, str]:
    """``(run directory, its report.html's text)`` of a finished run evaluated on val."""
    root = tmp_path_factory.mktemp("report")
    run_dir = make_run(root, "tiny", 0, {"train": 0.5}, (0.4, 0.6, 0.7), flags={"loss": "focal"})
    image_dir = root / "images"
    image_dir.mkdir()
    predictions = val_predictions(str(image_dir))
    predictions.to_csv(os.path.join(run_dir, rundir.predictions_of_split("val")), index=False)
    y_true = predictions["true_class"].map(CLASSES.index).to_numpy()
    probabilities = predictions[[f"p_{metrics.metric_suffix(n)}" for n in CLASSES]].to_numpy()
    matrix = metrics.confusion_matrix(y_true, probabilities.argmax(axis=-1), len(CLASSES))
    report = metrics.classification_report(matrix, CLASSES, y_true, probabilities, resamples=200)
    bins = calibration.reliability(probabilities, y_true)
    report["calibration"] = {"ece": bins["ece"], "reliability": bins}
    rundir.write_json(os.path.join(run_dir, rundir.metrics_of_split("val")), report)
    counts = {"train": {"Normal": 20, "Bacteria": 30, "Virus": 20}, "val": {"Normal": 5, "Bacteria": 4, "Virus": 4}}
    training = {"synthetic_data": True, "data_dir": "/data/somewhere", "task": "four_class", "classes": CLASSES,
                "images": counts, "excluded_rows": {"Stress-Smoking, in no class": 2},
                "model_selection": {"monitor": "val_loss", "best_epoch": 2, "epochs_run": 3},
                "splits": {"train": {"accuracy": 0.5, "num_images": 70}}}
    rundir.write_json(os.path.join(run_dir, rundir.METRICS), training)
    rundir.write_json(os.path.join(run_dir, rundir.CLASSES), CLASSES)
    history = pd.read_csv(os.path.join(run_dir, rundir.HISTORY))
    for i, name in enumerate(CLASSES):
        suffix = metrics.metric_suffix(name)
        history[f"recall_{suffix}"], history[f"val_recall_{suffix}"] = 0.2 * i + 0.1, 0.2 * i
    history.to_csv(os.path.join(run_dir, rundir.HISTORY), index=False)
    Image.new("RGB", CONFUSION_PNG_SIZE, "white").save(os.path.join(run_dir, rundir.confusion_matrix_png("val")))
    tiny_model().save(os.path.join(run_dir, rundir.MODEL))
    path = run_report.write_report(run_dir, images_per_group=PER_GROUP, overlay_size=48)
    assert path == os.path.join(run_dir, rundir.REPORT)
    with open(path, encoding="utf-8") as handle:
        return run_dir, handle.read()


class _Page(HTMLParser):
    """The tags a self-contained page must not have, its images, and the Grad-CAM figures' classes."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.outside, self.figures = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("script", "link", "iframe", "object", "embed") or any(
                (attrs.get(name) or "").startswith(("http:", "https:", "//", "file:")) for name in ("src", "href")):
            self.outside.append((tag, attrs))
        if tag == "figure":
            self.figures.append(attrs.get("class"))


def decoded_pngs(text: str) -> list[Image.Image]:
    pngs = []
    for attrs in _Page(text).images:
        prefix, _, data = attrs["src"].partition(",")
        assert prefix == "data:image/png;base64", prefix
        content = base64.b64decode(data, validate=True)
        assert content.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(content))
        image.load()  # decodes every byte: a truncated PNG fails here
        pngs.append(image)
    return pngs


def test_every_image_is_an_inline_png_and_nothing_is_fetched(report_run):
    _, text = report_run
    page = _Page(text)
    assert page.outside == []
    pngs = decoded_pngs(text)
    # Curves; val's four figures; Grad-CAM: per class 2 correct, and the wrong ones (Normal's two, one of
    # which is gone; one of each other class).
    assert len(pngs) == 1 + 4 + 3 * PER_GROUP + 3
    assert CONFUSION_PNG_SIZE in [png.size for png in pngs]  # the run's own PNG, not a drawing of it


def test_page_shows_the_runs_numbers_and_says_what_is_absent(report_run):
    run_dir, text = report_run
    report = json.load(open(os.path.join(run_dir, rundir.metrics_of_split("val"))))
    low, high = report["ci95"]["accuracy"]
    assert f"{100 * report['accuracy']:.1f}%</td><td>{100 * low:.1f}–{100 * high:.1f}%" in text
    low, high = report["ci95"][metrics.interval_name("recall", "Virus")]
    assert f"{100 * low:.1f}–{100 * high:.1f}%" in text
    assert "<td>Accuracy</td><td>50.0%</td><td>—</td>" in text  # train: a point estimate without interval
    assert "<td>--loss</td><td>focal</td>" in text and "SYNTHETIC" in text
    assert "<td>Bacteria</td><td>30</td><td>4</td>" in text and "Stress-Smoking, in no class" in text
    assert "model of epoch 2 of 3" in text
    for absent in ("No confusion matrix: no confusion matrix in the report.",
                   "No ROC curves: no predictions_train.csv.", "No reliability diagram: no calibration in the report."):
        assert absent in text


def test_gradcam_grid_shows_the_surest_correct_and_wrong_images_per_class(report_run):
    _, text = report_run
    figures = _Page(text).figures
    assert figures.count("correct") == 3 * PER_GROUP and figures.count("wrong") == 2 + 1 + 1
    assert "wrong: true Normal; gone.png: cannot be read" in text
    assert "correct: true Virus; virus-2.png" in text and "virus-0.png" not in text  # the surest two of three


def test_chosen_images_are_the_surest_per_class_and_outcome(tmp_path):
    chosen = run_report.chosen_images(val_predictions(str(tmp_path)), CLASSES, 1)
    assert len(chosen) == 2 * len(CLASSES)
    assert chosen.set_index(["true_class", "outcome"]).loc[("Bacteria", "correct"), "file"].endswith("bacteria-2.png")
    np.testing.assert_allclose(chosen.loc[chosen["file"].str.endswith("gone.png"), "confidence"], 0.95)


def test_an_unfinished_run_gets_a_page_that_says_what_it_lacks(tmp_path):
    run_dir = make_run(tmp_path, "unfinished", 0, {})
    os.remove(os.path.join(run_dir, rundir.METRICS))
    text = open(run_report.write_report(run_dir), encoding="utf-8").read()
    for absent in ("No data summary", "No evaluation", "No Grad-CAM overlays: the run has no predictions_val.csv"):
        assert absent in text
    assert len(decoded_pngs(text)) == 1  # the training curves


def test_a_missing_or_foreign_directory_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(rundir.RunError, match="nowhere: no such run directory"):
        run_report.write_report(str(tmp_path / "nowhere"))
    with pytest.raises(rundir.RunError, match="not a run directory"):
        run_report.write_report(str(tmp_path))
    with pytest.raises(ConfigError, match="images_per_group=-1"):
        run_report.write_report(str(tmp_path), images_per_group=-1)
    with pytest.raises(ConfigError, match="overlay_size=8"):
        run_report.write_report(str(tmp_path), overlay_size=8)


# Appended to a copy of the page: after loading, the title counts the images the browser could show.
_IMAGE_PROBE = ('<script>window.addEventListener("load", () => { const all = [...document.images]; document.title ='
                ' "LOADED " + all.filter(i => i.complete && i.naturalWidth > 0).length + " OF " + all.length; });'
                "</script></body>")


def test_every_image_loads_in_headless_chromium(report_run, tmp_path):
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if browser is None:
        pytest.skip(f"no headless Chromium on PATH (looked for {', '.join(BROWSERS)})")
    _, text = report_run
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _IMAGE_PROBE), encoding="utf-8")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    count = len(_Page(text).images)
    assert f"<title>LOADED {count} OF {count}</title>" in result.stdout, result.stdout[:300] + result.stderr[-2000:]


def test_cli_writes_the_page_and_names_a_missing_run(report_run, tmp_path, capsys):
    from xray_tf.cli import report as report_command

    run_dir, _ = report_run
    copy = shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns(rundir.MODEL))
    report_command.run_command(report_command.FLAGS(["xray-report", str(copy), "--gradcam_images=0"]))
    assert capsys.readouterr().out == f"Wrote {copy / rundir.REPORT}\n"
    assert "No Grad-CAM overlays: none were asked for." in (copy / rundir.REPORT).read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match="xray-report: error: .*nowhere: no such run directory"):
        report_command.run_command(report_command.FLAGS(["xray-report", str(tmp_path / "nowhere")]))
