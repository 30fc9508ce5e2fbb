"""Reliability (issue 7): bad images, metadata and flags stop a run before it starts with one
message naming the culprit; killed runs resume exactly; finished runs are never touched.

Most CLI cases run ``xray_tf.train``'s flag parsing and ``main`` in this process (``train_cli``),
which saves ~10 s of imports per case; the resume test and one --check_data test use real
processes, since a process must be killed and an exit status observed from outside.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from conftest import REPO_ROOT, run_module
from xray_tf import data, models, pipeline, synthetic, train, training

TINY = ["--model=resnet50", "--weights=none", "--image_size=32", "--batch_size=8"]


# ---------------------------------------------------------------------------------------------
# Helpers


def train_cli(*args: str) -> tuple[int, str]:
    """``python -m xray_tf.train ARGS`` in this process: (exit status, error message + stdout).

    Mirrors absl's ``app.run``: a flag that does not parse exits with status 1 and absl's message;
    otherwise ``main`` runs and its ``sys.exit`` gives the status.
    """
    stdout = io.StringIO()
    try:
        argv = train.FLAGS(["xray_tf.train", *args])
        with contextlib.redirect_stdout(stdout):
            train.main(argv)
        return 0, stdout.getvalue()
    except flags.Error as error:
        return 1, str(error)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            return 1, exit_.code + "\n" + stdout.getvalue()
        return exit_.code or 0, stdout.getvalue()
    finally:
        train.FLAGS.unparse_flags()


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def ramp(height: int = 48, width: int = 64) -> np.ndarray:
    """A grey left-to-right ramp with some texture, uint8."""
    rows = np.tile(np.linspace(0, 255, width), (height, 1))
    return np.clip(rows + 20 * np.sin(np.arange(height))[:, None], 0, 255).astype(np.uint8)


def noise(size: int = 64) -> np.ndarray:
    """Random pixels: they compress badly, so damage lands in the image data, not in padding."""
    return np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)


def _truncated_jpeg(path: str) -> None:
    Image.fromarray(noise(), "L").save(path, format="JPEG")
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


def _truncated_png(path: str) -> None:
    Image.fromarray(noise(), "L").save(path, format="PNG")
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


def _corrupt_png(path: str) -> None:
    Image.fromarray(noise(), "L").save(path, format="PNG")
    content = bytearray(open(path, "rb").read())
    content[16:24] = bytes(8)  # width and height in the header: 0 x 0
    open(path, "wb").write(bytes(content))


# Bad files written under an existing image's name: (writer, words the reason must contain).
BAD_IMAGES = {
    "zero_byte": (lambda path: open(path, "wb").close(), "empty file"),
    "truncated_jpeg": (_truncated_jpeg, "JPEG file that does not decode"),
    "corrupt_png": (_corrupt_png, "PNG file that does not decode"),
    "truncated_png": (_truncated_png, "PNG file that ends early (truncated?)"),
    "text_named_jpeg": (lambda path: open(path, "w").write("<html>404 Not Found</html>\n"), "not an image but text"),
    "tiff": (lambda path: Image.fromarray(ramp(), "L").save(path, format="TIFF"), "TIFF image: not supported"),
}

# Odd but valid files: (writer, largest grey-level difference from the ramp saved as grey PNG).
SUPPORTED_IMAGES = {
    "gif": (lambda path: Image.fromarray(ramp(), "L").save(path, format="GIF"), 0),
    "bmp": (lambda path: Image.fromarray(ramp(), "L").save(path, format="BMP"), 0),
    "webp": (lambda path: Image.fromarray(ramp(), "L").save(path, format="WEBP", lossless=True), 0),
    "cmyk_jpeg": (lambda path: Image.fromarray(ramp(), "L").convert("CMYK").save(path, format="JPEG", quality=95), 4),
    "png_16_bit": (lambda path: Image.fromarray(ramp().astype(np.uint16) * 257).save(path, format="PNG"), 0),
    "rgba_png": (lambda path: Image.fromarray(np.dstack([ramp()] * 3 + [np.full_like(ramp(), 128)]), "RGBA")
                 .save(path, format="PNG"), 0),
    "grey_alpha_png": (lambda path: Image.fromarray(ramp(), "L").convert("LA").save(path, format="PNG"), 0),
    "rgb_jpeg": (lambda path: Image.fromarray(np.dstack([ramp()] * 3), "RGB").save(path, format="JPEG", quality=95),
                 4),
}


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> str:
    """A tiny CoronaHack-layout dataset: 30 TRAIN images (12 Bacteria) and 24 TEST images."""
    out = tmp_path_factory.mktemp("reliability") / "coronahack"
    return synthetic.write_dataset(str(out), num_train=24, num_test=8, seed=7, min_size=40, max_size=64)


@pytest.fixture
def dataset(clean_dataset, tmp_path) -> str:
    """A private copy of ``clean_dataset`` that a test may damage."""
    return shutil.copytree(clean_dataset, tmp_path / "data")


def metadata(data_dir: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(data_dir, data.METADATA_CSV), index_col=0)


def image_path(data_dir: str, name: str) -> str:
    split = "test" if "-test-" in name else "train"
    return os.path.join(data_dir, data.IMAGE_FOLDER, data.IMAGE_FOLDER, split, name)


def bacteria_train_images(data_dir: str) -> list[str]:
    """Paths of the Bacteria TRAIN images (12, the largest class: it survives losing a few)."""
    frame = metadata(data_dir)
    names = frame.loc[(frame["Label_1_Virus_category"] == "bacteria") & (frame["Dataset_type"] == "TRAIN"),
                      "X_ray_image_name"]
    return [image_path(data_dir, name) for name in sorted(names)]


# ---------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("kind", sorted(SUPPORTED_IMAGES))
def test_odd_but_valid_files_decode_like_their_grey_original(kind, tmp_path):
    reference = str(tmp_path / "reference.png")
    Image.fromarray(ramp(), "L").save(reference)
    write, tolerance = SUPPORTED_IMAGES[kind]
    path = str(tmp_path / f"image.{kind}")
    write(path)
    decoded = pipeline.decode_image(tf.constant(path), 32).numpy().astype(int)
    expected = pipeline.decode_image(tf.constant(reference), 32).numpy().astype(int)
    assert np.abs(decoded - expected).max() <= tolerance
    assert pipeline.find_unreadable([path], 32) == {}


def test_tiny_and_huge_images_decode(tmp_path):
    one = str(tmp_path / "one.png")
    Image.fromarray(np.full((1, 1), 200, np.uint8), "L").save(one)
    huge = str(tmp_path / "huge.png")  # 10000 x 10000: 100 MB decoded, ~100 kB on disk
    Image.fromarray(np.zeros((10_000, 10_000), np.uint8), "L").save(huge)
    assert np.all(pipeline.decode_image(tf.constant(one), 32).numpy() == 200)
    assert np.all(pipeline.decode_image(tf.constant(huge), 32).numpy() == 0)
    assert pipeline.find_unreadable([one, huge], 32) == {}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_find_unreadable_says_why(kind, tmp_path):
    write, words = BAD_IMAGES[kind]
    bad, good = str(tmp_path / "bad.jpeg"), str(tmp_path / "good.png")
    write(bad)
    Image.fromarray(ramp(), "L").save(good)
    assert set(pipeline.find_unreadable([good, bad, good], 32)) == {bad}
    assert words in pipeline.find_unreadable([bad], 32)[bad]


def test_unsupported_formats_are_named():
    dicom = bytes(128) + b"DICM" + bytes(16)
    assert pipeline.sniff_format(dicom) == "DICOM"
    assert pipeline.sniff_format(b"II*\x00" + bytes(8)) == "TIFF"
    assert pipeline.sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WebP"
    assert pipeline.sniff_format(b"hello") is None
    assert set(pipeline.UNSUPPORTED_FORMATS) == {"TIFF", "DICOM", "JPEG 2000"}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_a_bad_image_stops_training_before_it_starts(kind, dataset, tmp_path):
    culprit = bacteria_train_images(dataset)[3]
    write, words = BAD_IMAGES[kind]
    write(culprit)
    status, message = train_cli(*TINY, f"--data_dir={dataset}", f"--output_dir={tmp_path / 'runs'}")
    assert status == 1
    assert f"{culprit}: " in message and words in message and "--on_bad_image=skip" in message
    assert not os.path.exists(tmp_path / "runs")  # nothing was created


def test_check_data_reports_every_bad_file_at_once(dataset, tmp_path):
    """A real process: ``--check_data`` lists every bad file with its reason and exits 1."""
    culprits = dict(zip(BAD_IMAGES, bacteria_train_images(dataset)))
    for kind, path in culprits.items():
        BAD_IMAGES[kind][0](path)
    result = run_module("xray_tf.train", "--check_data", f"--data_dir={dataset}", "--image_size=32",
                        f"--output_dir={tmp_path / 'runs'}", timeout=300)
    assert result.returncode == 1
    assert f"{len(culprits)} image file(s) cannot be decoded" in result.stderr
    for kind, path in culprits.items():
        assert f"{path}: " in result.stderr and BAD_IMAGES[kind][1] in result.stderr, kind
    assert not os.path.exists(tmp_path / "runs")


def test_check_data_passes_odd_but_valid_files(dataset, tmp_path):
    targets = bacteria_train_images(dataset)
    for (kind, (write, _)), path in zip(sorted(SUPPORTED_IMAGES.items()), targets):
        write(path)  # the content is GIF, BMP, ... whatever the file's name says
    Image.fromarray(np.zeros((10_000, 10_000), np.uint8), "L").save(targets[-1], format="PNG")
    Image.fromarray(np.full((1, 1), 9, np.uint8), "L").save(targets[-2], format="PNG")
    status, output = train_cli("--check_data", f"--data_dir={dataset}", "--image_size=32",
                               f"--output_dir={tmp_path / 'runs'}")
    assert status == 0, output
    assert "No problems found." in output and "train:" in output


def test_check_data_with_skip_lists_what_training_would_leave_out(dataset, tmp_path):
    culprit = bacteria_train_images(dataset)[0]
    open(culprit, "wb").close()
    status, output = train_cli("--check_data", "--on_bad_image=skip", f"--data_dir={dataset}", "--image_size=32",
                               f"--output_dir={tmp_path / 'runs'}")
    assert status == 1
    assert "1 image file(s) cannot be decoded; --on_bad_image=skip leaves them out" in output
    assert f"{culprit}: empty file" in output


def test_skipping_must_leave_every_class_some_training_images(dataset, tmp_path):
    frame = metadata(dataset)
    covid = frame.loc[(frame["Label_2_Virus_category"] == "COVID-19") & (frame["Dataset_type"] == "TRAIN"),
                      "X_ray_image_name"]
    for name in covid:
        open(image_path(dataset, name), "wb").close()
    status, message = train_cli("--check_data", "--on_bad_image=skip", f"--data_dir={dataset}", "--image_size=32",
                                f"--output_dir={tmp_path / 'runs'}")
    assert status == 1
    assert f"Without the {len(covid)} image(s) unreadable" in message and "class(es) COVID-19" in message


# ---------------------------------------------------------------------------------------------
# Metadata


def _drop_csv(root: str) -> str:
    os.remove(os.path.join(root, data.METADATA_CSV))
    return data.METADATA_CSV


def _drop_column(root: str) -> str:
    metadata(root).drop(columns=["Label"]).to_csv(os.path.join(root, data.METADATA_CSV))
    return "missing column(s) Label"


def _missing_file(root: str) -> str:
    name = metadata(root)["X_ray_image_name"].iloc[5]
    os.remove(image_path(root, name))
    return name


def _unknown_label(root: str) -> str:
    frame = metadata(root)
    frame.loc[frame.index[3], "Label"] = "Cat"
    frame.to_csv(os.path.join(root, data.METADATA_CSV))
    name = frame["X_ray_image_name"].iloc[3]
    return f"labels that match no class rule:\n  row 3: X_ray_image_name={name!r}, Label='Cat'"


def _duplicate_row(root: str) -> str:
    frame = metadata(root)
    pd.concat([frame, frame.iloc[[4]]]).reset_index(drop=True).to_csv(os.path.join(root, data.METADATA_CSV))
    return f"naming the same image more than once:\n  row 4: X_ray_image_name={frame['X_ray_image_name'].iloc[4]!r}"


def _empty_csv(root: str) -> str:
    open(os.path.join(root, data.METADATA_CSV), "w").close()
    return "the file is empty"


def _header_only(root: str) -> str:
    metadata(root).iloc[:0].to_csv(os.path.join(root, data.METADATA_CSV))
    return "no rows"


def _class_without_training_images(root: str) -> str:
    frame = metadata(root)
    covid_train = (frame["Label_2_Virus_category"] == "COVID-19") & (frame["Dataset_type"] == "TRAIN")
    frame[~covid_train].to_csv(os.path.join(root, data.METADATA_CSV))
    return "no training images of class(es) COVID-19"


BAD_METADATA = {
    "csv_missing": _drop_csv,
    "column_missing": _drop_column,
    "file_missing": _missing_file,
    "unknown_label": _unknown_label,
    "duplicate_row": _duplicate_row,
    "empty_csv": _empty_csv,
    "header_only_csv": _header_only,
    "class_without_training_images": _class_without_training_images,
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_stops_training_before_it_starts(case, dataset, tmp_path):
    culprit = BAD_METADATA[case](dataset)
    status, message = train_cli(*TINY, f"--data_dir={dataset}", f"--output_dir={tmp_path / 'runs'}")
    assert status == 1 and message.startswith("xray_tf.train: error: ")
    assert culprit in message
    assert not os.path.exists(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------
# Flags


def _wrong_architecture_weights(tmp_path) -> str:
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    return path


BAD_FLAGS = {  # case -> (flags, words the message must contain)
    "unknown_model": (["--model=vgg16"], "--model=vgg16: value should be one of"),
    "unknown_loss": (["--loss=hinge"], "--loss=hinge: value should be one of"),
    "unknown_task": (["--task=three_class"], "--task=three_class: value should be one of"),
    "unknown_on_bad_image": (["--on_bad_image=ignore"], "--on_bad_image=ignore: value should be one of"),
    "zero_epochs": (["--epochs=0"], "--epochs=0 must be positive"),
    "negative_epochs": (["--epochs=-3"], "--epochs=-3 must be positive"),
    "zero_batch_size": (["--batch_size=0"], "--batch_size=0 must be positive"),
    "small_image_size": (["--image_size=31"], "--image_size=31 is below 32"),
    "val_fraction_zero": (["--val_fraction=0"], "--val_fraction=0.0 must be strictly between 0 and 1"),
    "val_fraction_one": (["--val_fraction=1.5"], "--val_fraction=1.5 must be strictly between 0 and 1"),
    "chexnet_weights_missing": (["--model=densenet_chexnet", "--chexnet_weights=/nowhere/chexnet.weights.h5"],
                                "--chexnet_weights='/nowhere/chexnet.weights.h5' does not exist"),
    "chexnet_without_weights": (["--model=densenet_chexnet"], "--model=densenet_chexnet needs --chexnet_weights"),
    "resume_without_run_name": (["--resume"], "--resume needs --run_name"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_stop_before_training(case, clean_dataset, tmp_path):
    args, words = BAD_FLAGS[case]
    status, message = train_cli(*TINY, f"--data_dir={clean_dataset}", f"--output_dir={tmp_path / 'runs'}", *args)
    assert status == 1 and words in message
    assert not os.path.exists(tmp_path / "runs")


def test_an_output_dir_that_cannot_be_created_is_named(clean_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    status, message = train_cli(*TINY, f"--data_dir={clean_dataset}", f"--output_dir={blocker / 'runs'}")
    assert status == 1 and f"--output_dir='{blocker / 'runs'}' cannot be created: {blocker} is a file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_output_dir_is_named(clean_dataset, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    status, message = train_cli(*TINY, f"--data_dir={clean_dataset}", f"--output_dir={read_only}")
    assert status == 1 and "is not writable" in message


def test_chexnet_weights_of_another_architecture_are_refused(clean_dataset, tmp_path):
    weights = _wrong_architecture_weights(tmp_path)
    status, message = train_cli(*TINY, "--model=densenet_chexnet", f"--chexnet_weights={weights}",
                                f"--data_dir={clean_dataset}", f"--output_dir={tmp_path / 'runs'}")
    assert status == 1 and f"--chexnet_weights='{weights}' is not a converted CheXNet weights file" in message
    assert not os.path.exists(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------
# Runs: divergence, backups, resume


def test_a_diverging_run_stops_with_a_message_about_the_learning_rate(clean_dataset, tmp_path):
    status, message = train_cli(*TINY, "--epochs=3", "--learning_rate=1e38", f"--data_dir={clean_dataset}",
                                f"--output_dir={tmp_path}", "--run_name=nan")
    assert status == 1
    assert "the loss became NaN or infinite. Lower --learning_rate (it is 1e+38)" in message
    assert not os.path.exists(tmp_path / "nan" / "metrics.json")
    assert not os.path.exists(tmp_path / "nan" / training.BACKUP_DIR)  # the NaN epoch is not backed up


def test_read_history_keeps_the_epochs_of_the_backup(tmp_path):
    path = str(tmp_path / "history.csv")
    with open(path, "w") as handle:
        handle.write("epoch,loss,val_loss\n1,2.5,2.0\n2,1.5,\n3,1.0,0.5\n")
    assert training.read_history(path, 2) == [{"epoch": 1, "loss": 2.5, "val_loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    assert training.read_history(str(tmp_path / "none.csv"), 2) == []


def test_epoch_backup_restores_weights_and_optimizer_state(tmp_path):
    def compiled() -> keras.Model:
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
        return model

    x, y = np.random.default_rng(0).normal(size=(16, 3)), np.zeros((16, 2))
    trained = compiled()
    trained.fit(x, y, epochs=3, verbose=0, callbacks=[training.EpochBackup(str(tmp_path))])
    assert os.listdir(tmp_path) == ["epoch-0003.npz"]  # older backups removed
    restored = compiled()
    assert training.restore_backup(restored, str(tmp_path)) == 3
    assert len(trained.optimizer.variables) == len(restored.optimizer.variables) > 2
    pairs = zip(trained.optimizer.variables + trained.weights, restored.optimizer.variables + restored.weights)
    for mine, theirs in pairs:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs))
    assert training.restore_backup(compiled(), str(tmp_path / "none")) == 0
    older_format = tmp_path / "h5"  # what runs started before backups became .npz left behind
    older_format.mkdir()
    trained.save_weights(str(older_format / "epoch-0002.weights.h5"))
    from_h5 = compiled()
    assert training.restore_backup(from_h5, str(older_format)) == 2
    np.testing.assert_array_equal(from_h5.get_weights()[0], trained.get_weights()[0])
    wider = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
    wider.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    with pytest.raises(ValueError, match="epoch-0003.npz holds the training state of another model"):
        training.restore_backup(wider, str(tmp_path))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])  # the latter wraps Adam in a LossScaleOptimizer
def test_the_best_epochs_backup_is_kept_and_becomes_the_model_file(policy, tmp_path):
    """Backups of the newest and the best epoch stay; ``write_best_model`` saves the best one's state."""
    with training.global_dtype_policy(policy):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    backup_dir = str(tmp_path / "backup")
    backup = training.EpochBackup(backup_dir)
    backup.set_model(model)
    backup.on_train_begin()
    states = []
    for epoch, val_loss in enumerate([3.0, 1.0, 2.0, math.nan, 4.0]):
        model.layers[0].kernel.assign(np.full((3, 2), epoch, np.float32))
        model.optimizer.iterations.assign(10 * epoch)
        states.append([keras.ops.convert_to_numpy(v) for v in model.weights + model.optimizer.variables])
        backup.on_epoch_end(epoch, {"val_loss": val_loss})
        backup._wait()
    backup.on_train_end()
    assert backup.best_epoch == 2 and backup.best == 1.0
    assert sorted(os.listdir(backup_dir)) == ["epoch-0002.npz", "epoch-0005.npz"]
    path = str(tmp_path / "model.keras")
    best = training.write_best_model(keras.saving.serialize_keras_object(model), policy, backup_dir, 2, path)
    assert len(best.optimizer.variables) == len(model.optimizer.variables)
    for expected, variable in zip(states[1], best.weights + best.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected)
    np.testing.assert_array_equal(models.load_model(path).get_weights()[0], states[1][0])
    assert training.restore_backup(model, backup_dir) == 5  # resuming takes the newest


def test_a_run_resumed_from_an_older_version_keeps_the_model_file_it_wrote(tmp_path):
    """Older versions saved ``model.keras`` at each new best epoch and kept no backup of it."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    path = str(tmp_path / "model.keras")
    model.save(path)
    (tmp_path / "backup").mkdir()
    loaded = training.write_best_model(keras.saving.serialize_keras_object(model), "float32",
                                       str(tmp_path / "backup"), 2, path)
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])


def test_a_backup_that_cannot_be_written_fails_the_fit(tmp_path):
    """The backup is written by a thread; its error must still reach the training thread."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(OSError):
        model.fit(np.zeros((4, 3)), np.zeros((4, 2)), epochs=2, verbose=0,
                  callbacks=[training.EpochBackup(str(blocker / "backup"))])


def test_an_epoch_is_the_same_batches_whenever_it_is_built(clean_dataset):
    index = data.load_index(clean_dataset)
    for sampler in ("balanced", "none"):
        settings = pipeline.PipelineSettings(image_size=32, batch_size=8, sampler=sampler, seed=5)
        datasets = pipeline.build_datasets(index.frame, 4, settings)
        steps = datasets.steps_per_epoch
        whole = [images.numpy() for images, _ in datasets.epochs(0, 3)]
        assert len(whole) == 3 * steps
        rebuilt = pipeline.build_datasets(index.frame, 4, settings)
        third = [images.numpy() for images, _ in rebuilt.epochs(2, 3)]
        assert all(np.array_equal(a, b) for a, b in zip(whole[2 * steps:], third)), sampler
        assert not np.array_equal(whole[0], whole[steps])  # epochs differ from each other


def test_interrupted_and_restored_training_ends_with_the_same_final_weights(clean_dataset, tmp_path):
    """The resume mechanism on a small model in this process, on the TF and JAX backends: epochs
    0-3 in one go equal epochs 0-1, a backup, a new model restored from it, and epochs 2-3; final
    weights compared exactly."""
    index = data.load_index(clean_dataset)
    datasets = pipeline.build_datasets(index.frame, 4, pipeline.PipelineSettings(image_size=32, batch_size=8))
    pipeline.fill_caches(datasets)

    def fitted(first: int, stop: int, backup_dir: str) -> keras.Model:
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                  keras.layers.Dense(4, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
        assert training.restore_backup(model, backup_dir) == first
        schedule = keras.callbacks.LearningRateScheduler(lambda epoch: training.step_decay(epoch, 1e-2, 0.5, 1))
        training.fit_epochs(model, datasets, first, stop, verbose=0,
                            callbacks=[schedule, training.EpochBackup(backup_dir)])
        return model

    uninterrupted = fitted(0, 4, str(tmp_path / "one_go"))
    fitted(0, 2, str(tmp_path / "interrupted"))
    resumed = fitted(2, 4, str(tmp_path / "interrupted"))
    for mine, theirs in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


def test_the_resume_mechanism_is_exact_on_jax_too():
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=", "-W", "ignore",
         f"{__file__}::test_interrupted_and_restored_training_ends_with_the_same_final_weights"],
        cwd=REPO_ROOT, env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]


RESUME_FLAGS = [*TINY, "--epochs=4", "--lr_decay_epochs=2", "--on_bad_image=skip"]
TIMEOUT_S = 900


def _train_process(data_dir: str, output_dir: str, run_name: str, log: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xray_tf.train", *RESUME_FLAGS, f"--data_dir={data_dir}",
         f"--output_dir={output_dir}", f"--run_name={run_name}"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
    )


def _newest_backup(run_dir: str) -> int:
    """The newest epoch backed up in ``run_dir`` (0: none); files still being written have other names."""
    backups = training._backups(os.path.join(run_dir, training.BACKUP_DIR))
    return training._backup_epoch(backups[-1]) if backups else 0


def _history_rows(run_dir: str) -> int:
    try:
        return len(read_rows(os.path.join(run_dir, "history.csv")))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, clean_dataset) -> dict:
    """An uninterrupted 4-epoch run and one SIGKILLed after epoch 2 and then resumed, same flags.

    The dataset has two unreadable images and both runs use --on_bad_image=skip. The two runs
    start together (they share 2 cores; each is single-threaded for most of its start-up).
    """
    root = tmp_path_factory.mktemp("resume")
    data_dir = shutil.copytree(clean_dataset, root / "data")
    bad = bacteria_train_images(str(data_dir))[:2]
    open(bad[0], "wb").close()
    open(bad[1], "w").write("not an image")
    runs = root / "runs"
    reference = _train_process(str(data_dir), str(runs), "reference", str(root / "reference.log"))
    killed = _train_process(str(data_dir), str(runs), "killed", str(root / "killed.log"))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # Backups are written in the background: epoch 2's may land after epoch 3 has begun.
        while _newest_backup(str(runs / "killed")) < 2:
            assert killed.poll() is None, "exited before epoch 2: " + (root / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "epoch 2 did not finish in time"
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        rows_at_kill = _history_rows(str(runs / "killed"))
        assert reference.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, \
            (root / "reference.log").read_text()[-3000:]
    finally:
        for process in (reference, killed):
            if process.poll() is None:
                process.kill()
    result = run_module("xray_tf.train", *RESUME_FLAGS, f"--data_dir={data_dir}", f"--output_dir={runs}",
                        "--run_name=killed", "--resume", timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"reference": str(runs / "reference"), "resumed": str(runs / "killed"), "rows_at_kill": rows_at_kill,
            "bad": bad, "data_dir": str(data_dir), "log": result.stderr}


def test_skip_trains_on_the_rest_and_lists_what_was_skipped(resumed):
    run_dir = resumed["reference"]
    skipped = read_rows(os.path.join(run_dir, training.SKIPPED_IMAGES_CSV))
    assert [row["path"] for row in skipped] == sorted(resumed["bad"])
    reasons = [row["reason"] for row in skipped]
    assert reasons == ["empty file (0 bytes)", "not an image but text starting 'not an image'"]
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["excluded_rows"]["unreadable, skipped (--on_bad_image=skip)"] == 2
    assert sum(metrics["images"]["train"].values()) + sum(metrics["images"]["val"].values()) == 28  # 30 - 2


def test_a_killed_run_resumes_to_the_uninterrupted_result(resumed):
    """Bit-identical on CPU: every epoch is the same batches (``Datasets.epochs``), the backup
    holds weights and Adam's state, and the LR schedule is a function of the epoch. Tolerance:
    1e-6 absolute on weights and metrics (observed: 0)."""
    assert resumed["rows_at_kill"] in (2, 3)  # killed once epoch 2 was backed up (epoch 3 may be logged)
    assert "Resuming" in resumed["log"]
    reference = read_rows(os.path.join(resumed["reference"], "history.csv"))
    history = read_rows(os.path.join(resumed["resumed"], "history.csv"))
    assert [row["epoch"] for row in history] == ["1", "2", "3", "4"]
    assert [float(row["learning_rate"]) for row in history] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    timing = {"epoch", "epoch_seconds", "train_images_per_second"}
    for mine, theirs in zip(history, reference):
        for key in set(theirs) - timing:
            assert float(mine[key]) == pytest.approx(float(theirs[key]), abs=1e-6), key
    weights = [models.load_model(os.path.join(resumed[run], "model.keras")).get_weights()
               for run in ("reference", "resumed")]
    for mine, theirs in zip(*weights):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)
    metrics = [json.load(open(os.path.join(resumed[run], "metrics.json"))) for run in ("reference", "resumed")]
    assert metrics[0]["model_selection"] == metrics[1]["model_selection"]
    assert metrics[1]["resumed_after_epoch"] in (2, 3)
    assert not os.path.exists(os.path.join(resumed["resumed"], training.BACKUP_DIR))


def test_a_finished_run_is_never_resumed_or_touched(resumed):
    run_dir = resumed["reference"]
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    status, message = train_cli(*RESUME_FLAGS, f"--data_dir={resumed['data_dir']}",
                                f"--output_dir={os.path.dirname(run_dir)}", "--run_name=reference", "--resume")
    assert status == 1 and "has finished (it has metrics.json); start a new run instead" in message
    assert before == {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}


def test_resume_refuses_other_settings_and_missing_runs(resumed, tmp_path):
    run_dir = resumed["resumed"]
    os.rename(os.path.join(run_dir, "metrics.json"), tmp_path / "metrics.json")  # as if unfinished
    try:
        status, message = train_cli(*RESUME_FLAGS, "--epochs=6", f"--data_dir={resumed['data_dir']}",
                                    f"--output_dir={os.path.dirname(run_dir)}", "--run_name=killed", "--resume")
    finally:
        os.rename(tmp_path / "metrics.json", os.path.join(run_dir, "metrics.json"))
    assert status == 1 and "--epochs was 4, now 6" in message
    assert f"--flagfile={os.path.join(run_dir, 'flags.txt')} --resume" in message
    status, message = train_cli(*RESUME_FLAGS, f"--data_dir={resumed['data_dir']}", f"--output_dir={tmp_path}",
                                "--run_name=never_started", "--resume")
    assert status == 1 and "nothing to resume" in message
