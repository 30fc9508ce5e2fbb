"""Hostile or careless input to ``xray-train`` (issue 19): every case ends with status 1 and one message
naming the culprit, no traceback, and nothing written where nothing should be.

The cases run ``xray_tf.cli.train`` in this process (``test_training.train_cli``). Memory cases assert
the refusal, never a measured memory use. The image-file and ``xray-predict`` cases are in
test_hostile_inputs, the converter's and the model files' in test_hostile_models.
"""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
from test_training import TINY, bacteria_train_images, metadata, train_cli

from xray_tf import data, layouts, models, resources, rundir, tables


@pytest.fixture
def dataset(clean_dataset, tmp_path) -> str:
    return shutil.copytree(clean_dataset, tmp_path / "data")


def refused(args: list[str], tmp_path, *culprits: str) -> str:
    """Run xray-train with ``args``; assert it stopped before writing anything, naming every culprit."""
    status, message = train_cli(*args, f"--output_dir={tmp_path / 'runs'}")
    assert status == 1, message
    assert "Traceback" not in message
    for culprit in culprits:
        assert culprit in message, (culprit, message)
    assert not os.path.exists(tmp_path / "runs")
    return message


# ---------------------------------------------------------------------------------------------
# 1. Work bounded by the dataset and by memory


def test_a_batch_larger_than_the_training_split_is_refused(dataset, tmp_path):
    training_images = len(data.load_index(dataset).split("train"))
    refused([*TINY, "--batch_size=100000", f"--data_dir={dataset}"], tmp_path,
            f"--batch_size=100000: more than the {training_images} training images")


def test_an_image_size_above_the_maximum_is_refused_before_the_data_is_read(tmp_path):
    refused([*TINY, "--image_size=100000", f"--data_dir={tmp_path / 'nowhere'}"], tmp_path,
            "--image_size=100000: above 2048")


def test_memory_estimate_names_the_flag_and_the_estimate():
    gigabyte = 2**30
    assert resources.memory_problems("resnet50", 224, 32, 5000, 64 * gigabyte) == []
    (batch,) = resources.memory_problems("resnet50", 224, 100_000, 0, 64 * gigabyte)
    assert batch.startswith("--batch_size=100000: a training step of resnet50 at 224 px needs about ")
    assert "GB (estimated)" in batch and "64.0 GB of memory is available" in batch
    cache, _ = resources.memory_problems("densenet121", 2048, 32, 5000, 8 * gigabyte)
    assert cache.startswith("--cache=memory: 5000 images of 2048 x 2048 px need 19.5 GB") and "--cache=DIR" in cache
    assert resources.memory_problems("resnet50", 224, 100_000, 0, 8 * gigabyte, step_on_host=False) == []
    assert resources.memory_problems("resnet50", 224, 100_000, 0, None) == []  # unknown: not guessed


def test_a_run_that_would_not_fit_in_memory_is_refused_before_decoding(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2**30)
    refused([*TINY, f"--data_dir={dataset}"], tmp_path, "--batch_size=8: a training step of mobilenetv3small")


# ---------------------------------------------------------------------------------------------
# 4. Paths stay inside their folders


@pytest.mark.parametrize("name", ["../../../../../../../../etc/passwd", "/etc/passwd", "../test/x.jpeg"])
def test_metadata_rows_naming_files_outside_the_image_folder_are_refused(name, dataset, tmp_path):
    frame = metadata(dataset)
    frame.loc[frame.index[2], "X_ray_image_name"] = name
    frame.to_csv(os.path.join(dataset, layouts.METADATA_CSV))
    message = refused([*TINY, f"--data_dir={dataset}"], tmp_path, "outside the image folder",
                      f"row 2: X_ray_image_name={name!r}")
    assert "root:" not in message  # the file was never read, let alone quoted


def test_extra_data_rows_stay_inside_its_images_folder(dataset, tmp_path):
    extra = tmp_path / "extra"
    (extra / "images").mkdir(parents=True)
    pd.DataFrame({"X_ray_image_name": ["../../data/secret.jpeg"], "Label": ["COVID-19"]}).to_csv(
        extra / "metadata.csv", index=False)
    refused([*TINY, f"--data_dir={dataset}", f"--extra_data={extra}"], tmp_path,
            f"{extra / 'metadata.csv'}: 1 row(s) naming a file outside the image folder")


@pytest.mark.parametrize("run_name", ["../../escaped", "/tmp/absolute-run", "a/b", ".."])
def test_run_name_must_be_a_plain_name(run_name, dataset, tmp_path):
    before = sorted(os.listdir(tmp_path))
    refused([*TINY, f"--data_dir={dataset}", f"--run_name={run_name}"], tmp_path,
            f"--run_name={run_name}: must be a plain name")
    assert sorted(os.listdir(tmp_path)) == before
    assert not os.path.exists("/tmp/absolute-run")


# ---------------------------------------------------------------------------------------------
# 5. Numbers that cannot work


@pytest.mark.parametrize("flag", ["--rotation_degrees=nan", "--rotation_degrees=inf", "--learning_rate=inf",
                                  "--focal_gamma=nan", "--val_fraction=nan"])
def test_non_finite_numbers_are_refused_before_the_data_is_read(flag, tmp_path):
    refused([*TINY, flag, f"--data_dir={tmp_path}"], tmp_path, f"{flag}: must be a finite number")


# ---------------------------------------------------------------------------------------------
# 6. OS errors name the path, at the moment they happen, and leave the run resumable (a failed
# epoch backup stopping training at the next step: test_callbacks)


def test_write_errors_name_the_file_not_its_temporary(tmp_path):
    (tmp_path / "taken.json").mkdir()  # a folder where the file should go
    with pytest.raises(rundir.RunError, match=rf"^cannot write {tmp_path / 'taken.json'} \(a report\): Is a directory"):
        rundir.write_json(str(tmp_path / "taken.json"), {})
    assert os.listdir(tmp_path) == ["taken.json"]  # no temporary left behind


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "backup").mkdir()
    leftovers = [tmp_path / ".history.csv.0a1b2c3d.tmp.csv", tmp_path / "backup" / ".epoch_0003.npz.deadbeef.tmp.npz"]
    for path in leftovers:
        path.write_text("half")
    (tmp_path / ".saved_model.0123abcd.tmp").mkdir()
    (tmp_path / ".saved_model.0123abcd.tmp" / "saved_model.pb").write_text("half")
    kept = [tmp_path / "history.csv", tmp_path / ".hidden-by-user"]
    for path in kept:
        path.write_text("x")
    removed = rundir.remove_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(map(str, [*leftovers, tmp_path / ".saved_model.0123abcd.tmp"]))
    assert sorted(os.listdir(tmp_path)) == sorted([".hidden-by-user", "backup", "history.csv"])


# ---------------------------------------------------------------------------------------------
# 7. One pass, one report


def test_every_metadata_and_file_problem_comes_in_one_report(dataset, tmp_path):
    frame = metadata(dataset)
    frame.loc[frame.index[1], "Dataset_type"] = "VALIDATION"
    frame.loc[frame.index[3], "Label"] = "Cat"
    frame.to_csv(os.path.join(dataset, layouts.METADATA_CSV))
    missing, undecodable = bacteria_train_images(dataset)[-2:]
    os.remove(missing)
    with open(undecodable, "wb") as handle:
        handle.write(b"<html>not an image</html>")
    refused(["--check_data", *TINY, f"--data_dir={dataset}"], tmp_path,
            "Dataset_type other than TRAIN/TEST", "row 1:", "labels that match no class rule", "row 3:",
                      f"{missing}: ", f"{undecodable}: not an image but text")


def test_check_data_applies_the_empty_validation_check(dataset, tmp_path):
    frame = metadata(dataset)
    one_each = frame[frame["Dataset_type"] == "TRAIN"].groupby(layouts.coronahack_fine_classes(frame)).head(1)
    one_each.to_csv(os.path.join(dataset, layouts.METADATA_CSV))
    refused(["--check_data", *TINY, "--batch_size=2", f"--data_dir={dataset}"], tmp_path,
            "no validation images, so no epoch can be chosen")


# ---------------------------------------------------------------------------------------------
# 8. CSV problems name the file (and the line)


def _binary(path: str) -> str:
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    return "a binary file (it holds NUL bytes), not a CSV table"


def _latin1(path: str) -> str:
    frame = pd.read_csv(path, index_col=0)
    frame.loc[frame.index[0], "Label_2_Virus_category"] = "Pneumonie bactérienne"
    frame.to_csv(path, encoding="latin-1")
    return "not UTF-8 text (byte 0xe9"


def _too_many_fields(path: str) -> str:
    with open(path) as handle:
        lines = handle.readlines()
    lines[4] = lines[4].rstrip("\n") + ",surplus,fields\n"
    with open(path, "w") as handle:
        handle.writelines(lines)
    return ", line 5: not a well-formed CSV table (Expected 6 fields in line 5, saw 8)"


@pytest.mark.parametrize("damage", [_binary, _latin1, _too_many_fields])
def test_a_csv_that_is_not_clean_utf8_text_is_named_with_its_line(damage, dataset, tmp_path):
    csv_path = os.path.join(dataset, layouts.METADATA_CSV)
    words = damage(csv_path)
    refused([*TINY, f"--data_dir={dataset}"], tmp_path, f"{csv_path}{'' if words.startswith(',') else ': '}{words}")


def test_image_paths_are_resolved_inside_their_folder(tmp_path):
    names = pd.Series(["a.jpeg", "sub/b.png", "../c.jpeg", "/etc/passwd", "sub/../d.jpeg", "."])
    paths, outside = tables.image_paths(str(tmp_path), names)
    assert paths[0] == str(tmp_path / "a.jpeg") and paths[4] == str(tmp_path / "d.jpeg")
    assert outside.tolist() == [False, False, True, True, False, True]


# ---------------------------------------------------------------------------------------------
# 8. Offline, the ImageNet download is refused before any image is decoded


def test_an_unreachable_imagenet_download_is_named_before_decoding(dataset, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    monkeypatch.setattr(models, "_host_answers", lambda host, port, timeout: False)
    message = refused([*TINY, "--weights=imagenet", f"--data_dir={dataset}"], tmp_path,
                      "--weights=imagenet: Keras downloads mobilenetv3small's ImageNet weights", "--weights=none")
    assert message.count("\n") <= 2  # one paragraph, no traceback from Keras' downloader
    before_decoding = [r.message for r in caplog.records if "problem(s) found before decoding" in r.message]
    assert len(before_decoding) == 1 and "--weights=imagenet" in before_decoding[0]


def test_tensorboard_without_its_package_is_refused_before_training(clean_dataset, tmp_path, monkeypatch):
    from xray_tf import tensorboard_logs

    monkeypatch.setattr(tensorboard_logs, "missing_package", lambda: "TensorBoard logs need the tensorboard package")
    refused([*TINY, f"--data_dir={clean_dataset}", "--tensorboard"], tmp_path,
            "--tensorboard=True: TensorBoard logs need the tensorboard package")


@pytest.mark.parametrize("flag, problem", [
    ("--optimizer=adamw", "--weight_decay=0.0: --optimizer=adamw needs a positive --weight_decay"),
    ("--warmup_epochs=20", "--warmup_epochs=20: must be fewer than --epochs=20"),
    ("--label_smoothing=1", "--label_smoothing=1.0: must be in [0, 1)"),
    ("--crop_scale_min=1.5", "--crop_scale_min=1.5: a share of the image: at most 1"),
    ("--select_by=val_recall", "--select_by=val_recall: value should be one of <val_loss|val_accuracy"),
])
def test_lever_settings_that_cannot_work_are_named(flag, problem, clean_dataset, tmp_path):
    refused([*TINY, f"--data_dir={clean_dataset}", flag], tmp_path, problem)
