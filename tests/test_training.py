"""One training run (``xray_tf.training``, through ``xray-train``): bad images, metadata and flags stop
a run before it starts with one message naming the culprit; a diverging run stops; a killed run
resumes exactly; a finished run is never touched (issue 7).

Most CLI cases run ``xray_tf.cli.train``'s flag parsing and ``run_command`` in this process
(``train_cli``), which saves ~10 s of imports per case; the resume test and one --check_data test use
real processes, since a process must be killed and an exit status observed from outside. The backup
format and the callbacks are tested on their own in test_checkpoint and test_callbacks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
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
from absl import flags
from conftest import REPO_ROOT, run_module
from image_files import BAD_IMAGES, SUPPORTED_IMAGES
from PIL import Image

from xray_tf import checkpoint, layouts, models, optimizers, rundir
from xray_tf.cli import train as train_command

# The cheapest backbone: these tests are about the run, not the network.
TINY = ["--model=mobilenetv3small", "--weights=none", "--image_size=32", "--batch_size=8"]


# ---------------------------------------------------------------------------------------------
# Helpers


def train_cli(*args: str) -> tuple[int, str]:
    """``xray-train ARGS`` in this process: (exit status, error message + stdout).

    Mirrors absl's ``app.run``: a flag that does not parse exits with status 1 and absl's message;
    otherwise ``run_command`` runs and its ``sys.exit`` gives the status.
    """
    stdout = io.StringIO()
    try:
        argv = train_command.FLAGS(["xray-train", *args])
        with contextlib.redirect_stdout(stdout):
            train_command.run_command(argv)
        return 0, stdout.getvalue()
    except flags.Error as error:
        return 1, str(error)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            return 1, exit_.code + "\n" + stdout.getvalue()
        return exit_.code or 0, stdout.getvalue()
    finally:
        train_command.FLAGS.unparse_flags()


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def dataset(clean_dataset, tmp_path) -> str:
    """A private copy of ``clean_dataset`` that a test may damage."""
    return shutil.copytree(clean_dataset, tmp_path / "data")


def metadata(data_dir: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(data_dir, layouts.METADATA_CSV), index_col=0)


def image_path(data_dir: str, name: str) -> str:
    split = "test" if "-test-" in name else "train"
    return os.path.join(data_dir, layouts.IMAGE_FOLDER, layouts.IMAGE_FOLDER, split, name)


def bacteria_train_images(data_dir: str) -> list[str]:
    """Paths of the Bacteria TRAIN images (12, the largest class: it survives losing a few)."""
    frame = metadata(data_dir)
    names = frame.loc[(frame["Label_1_Virus_category"] == "bacteria") & (frame["Dataset_type"] == "TRAIN"),
                      "X_ray_image_name"]
    return [image_path(data_dir, name) for name in sorted(names)]


# ---------------------------------------------------------------------------------------------
# Images (what each bad file is called: test_decode and test_image_cache)


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
    result = run_module("xray_tf.train", "--check_data", *TINY, f"--data_dir={dataset}",
                        f"--output_dir={tmp_path / 'runs'}", timeout=300)
    assert result.returncode == 1
    assert f"{len(culprits)} image file(s) cannot be used" in result.stderr
    for kind, path in culprits.items():
        assert f"{path}: " in result.stderr and BAD_IMAGES[kind][1] in result.stderr, kind
    assert not os.path.exists(tmp_path / "runs")


def test_check_data_passes_odd_but_valid_files(dataset, tmp_path):
    targets = bacteria_train_images(dataset)
    for (kind, (write, _)), path in zip(sorted(SUPPORTED_IMAGES.items()), targets):
        write(path)  # the content is GIF, BMP, ... whatever the file's name says
    Image.fromarray(np.zeros((10_000, 10_000), np.uint8), "L").save(targets[-1], format="PNG")
    Image.fromarray(np.full((1, 1), 9, np.uint8), "L").save(targets[-2], format="PNG")
    status, output = train_cli("--check_data", *TINY, f"--data_dir={dataset}",
                               f"--output_dir={tmp_path / 'runs'}")
    assert status == 0, output
    assert "No problems found." in output and "train:" in output


def test_check_data_with_skip_lists_what_training_would_leave_out(dataset, tmp_path):
    culprit = bacteria_train_images(dataset)[0]
    open(culprit, "wb").close()
    status, output = train_cli("--check_data", *TINY, "--on_bad_image=skip", f"--data_dir={dataset}",
                               "--batch_size=8", f"--output_dir={tmp_path / 'runs'}")
    assert status == 1
    assert "1 image file(s) cannot be used; --on_bad_image=skip leaves them out" in output
    assert f"{culprit}: empty file" in output


def test_skipping_must_leave_every_class_some_training_images(dataset, tmp_path):
    frame = metadata(dataset)
    covid = frame.loc[(frame["Label_2_Virus_category"] == "COVID-19") & (frame["Dataset_type"] == "TRAIN"),
                      "X_ray_image_name"]
    for name in covid:
        open(image_path(dataset, name), "wb").close()
    status, message = train_cli("--check_data", *TINY, "--on_bad_image=skip", f"--data_dir={dataset}",
                                "--batch_size=8", f"--output_dir={tmp_path / 'runs'}")
    assert status == 1
    assert f"Without the {len(covid)} image(s) unreadable" in message and "class(es) COVID-19" in message


# ---------------------------------------------------------------------------------------------
# Metadata


def _drop_csv(root: str) -> str:
    os.remove(os.path.join(root, layouts.METADATA_CSV))
    return layouts.METADATA_CSV


def _drop_column(root: str) -> str:
    metadata(root).drop(columns=["Label"]).to_csv(os.path.join(root, layouts.METADATA_CSV))
    return "missing column(s) Label"


def _missing_file(root: str) -> str:
    name = metadata(root)["X_ray_image_name"].iloc[5]
    os.remove(image_path(root, name))
    return name


def _unknown_label(root: str) -> str:
    frame = metadata(root)
    frame.loc[frame.index[3], "Label"] = "Cat"
    frame.to_csv(os.path.join(root, layouts.METADATA_CSV))
    name = frame["X_ray_image_name"].iloc[3]
    return f"labels that match no class rule:\n  row 3: X_ray_image_name={name!r}, Label='Cat'"


def _duplicate_row(root: str) -> str:
    frame = metadata(root)
    pd.concat([frame, frame.iloc[[4]]]).reset_index(drop=True).to_csv(os.path.join(root, layouts.METADATA_CSV))
    return f"naming the same image more than once:\n  row 4: X_ray_image_name={frame['X_ray_image_name'].iloc[4]!r}"


def _empty_csv(root: str) -> str:
    open(os.path.join(root, layouts.METADATA_CSV), "w").close()
    return "the file is empty"


def _header_only(root: str) -> str:
    metadata(root).iloc[:0].to_csv(os.path.join(root, layouts.METADATA_CSV))
    return "no rows"


def _class_without_training_images(root: str) -> str:
    frame = metadata(root)
    covid_train = (frame["Label_2_Virus_category"] == "COVID-19") & (frame["Dataset_type"] == "TRAIN")
    frame[~covid_train].to_csv(os.path.join(root, layouts.METADATA_CSV))
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
    assert status == 1 and message.startswith("xray-train: error: ")
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
    "zero_epochs": (["--epochs=0"], "--epochs=0: must be positive"),
    "negative_epochs": (["--epochs=-3"], "--epochs=-3: must be positive"),
    "zero_batch_size": (["--batch_size=0"], "--batch_size=0: must be positive"),
    "small_image_size": (["--image_size=31"], "--image_size=31: below 32"),
    "data_dir_missing": (["--data_dir=/nowhere/coronahack"], "--data_dir=/nowhere/coronahack: not a directory"),
    "val_fraction_zero": (["--val_fraction=0"], "--val_fraction=0.0: must be strictly between 0 and 1"),
    "val_fraction_one": (["--val_fraction=1.5"], "--val_fraction=1.5: must be strictly between 0 and 1"),
    "chexnet_weights_missing": (["--model=densenet_chexnet", "--chexnet_weights=/nowhere/chexnet.weights.h5"],
                                "--chexnet_weights=/nowhere/chexnet.weights.h5: no such file"),
    "chexnet_without_weights": (["--model=densenet_chexnet"],
                                "--chexnet_weights=None: --model=densenet_chexnet needs the converted CheXNet weights"),
    "resume_without_run_name": (["--resume"], "--run_name=None: --resume needs the name of the run directory"),
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
    assert status == 1 and f"--output_dir={blocker / 'runs'}: cannot be created: {blocker} is a file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_output_dir_is_named(clean_dataset, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    status, message = train_cli(*TINY, f"--data_dir={clean_dataset}", f"--output_dir={read_only}")
    assert status == 1 and f"--output_dir={read_only}: not writable" in message


# Loading weights of another architecture on purpose: Keras warns about each layer before it fails.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_chexnet_weights_of_another_architecture_are_refused(clean_dataset, tmp_path):
    weights = _wrong_architecture_weights(tmp_path)
    status, message = train_cli(*TINY, "--model=densenet_chexnet", f"--chexnet_weights={weights}",
                                f"--data_dir={clean_dataset}", f"--output_dir={tmp_path / 'runs'}")
    assert status == 1 and f"--chexnet_weights={weights}: not a converted CheXNet weights file" in message
    assert not os.path.exists(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------
# Runs: the learning-rate schedule, divergence, skipped images, resume


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_message_about_the_learning_rate(clean_dataset, tmp_path):
    # The head alone diverges as surely, and a frozen backbone's train step is traced in half the time.
    status, message = train_cli(*TINY, "--epochs=3", "--freeze_backbone_epochs=3", "--learning_rate=1e38",
                                f"--data_dir={clean_dataset}", f"--output_dir={tmp_path}", "--run_name=nan")
    assert status == 1
    assert "the loss became NaN or infinite. Lower --learning_rate (it is 1e+38)" in message
    assert not os.path.exists(tmp_path / "nan" / "metrics.json")
    assert not os.path.exists(tmp_path / "nan" / rundir.BACKUP)  # the NaN epoch is not backed up


def test_early_stopping_ends_the_run_and_keeps_the_best_epoch(clean_dataset, tmp_path):
    """A frozen backbone and a negligible rate leave the predictions, so the validation accuracy, as
    they were: epoch 1 stays the best and patience 1 stops the run after epoch 2 of 4."""
    status, message = train_cli(*TINY, f"--data_dir={clean_dataset}", f"--output_dir={tmp_path}", "--run_name=early",
                                "--epochs=4", "--freeze_backbone_epochs=4", "--learning_rate=1e-12",
                                "--select_by=val_accuracy", "--early_stopping_patience=1")
    assert status == 0, message
    run_dir = tmp_path / "early"
    assert [row["epoch"] for row in read_rows(str(run_dir / "history.csv"))] == ["1", "2"]
    selection = json.load(open(run_dir / "metrics.json"))["model_selection"]
    assert selection["best_epoch"] == 1 and selection["stopped_early_after"] == 2
    assert selection["epochs_run"] == 2


# Every lever of issue 22 on: each keeps state or draws randomness that a resumed run must restore.
EVERY_LEVER = ["--optimizer=adamw", "--weight_decay=0.01", "--schedule=cosine", "--warmup_epochs=1",
               "--label_smoothing=0.1", "--ema_decay=0.9", "--freeze_backbone_epochs=3",
               "--backbone_lr_multiplier=0.5", "--augment=strong", "--mixup_alpha=0.4", "--cutmix_alpha=0.4",
               "--select_by=val_balanced_accuracy", "--early_stopping_patience=3"]
RESUME_FLAGS = [*TINY, "--epochs=4", "--on_bad_image=skip", *EVERY_LEVER]
TIMEOUT_S = 900


def _train_process(data_dir: str, output_dir: str, run_name: str, log: str, *more_flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xray_tf.train", *RESUME_FLAGS, f"--data_dir={data_dir}",
         f"--output_dir={output_dir}", f"--run_name={run_name}", *more_flags],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
    )


def _newest_backup(run_dir: str) -> int:
    """The newest epoch backed up in ``run_dir`` (0: none); files still being written have other names."""
    backups = checkpoint.backups(os.path.join(run_dir, rundir.BACKUP))
    return checkpoint.backup_epoch(backups[-1]) if backups else 0


def _history_rows(run_dir: str) -> int:
    try:
        return len(read_rows(os.path.join(run_dir, "history.csv")))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, clean_dataset) -> dict:
    """An uninterrupted 4-epoch run and one SIGKILLed after epoch 2 and then resumed, same flags:
    every lever on, the backbone frozen for 3 epochs (so the resumed run unfreezes it on its way).

    The dataset has two unreadable images and all runs use --on_bad_image=skip. The uninterrupted
    run goes on while the other is started, killed and resumed (they share 2 cores; each is
    single-threaded for most of its start-up).
    """
    root = tmp_path_factory.mktemp("resume")
    data_dir = shutil.copytree(clean_dataset, root / "data")
    bad = bacteria_train_images(str(data_dir))[:2]
    open(bad[0], "wb").close()
    open(bad[1], "w").write("not an image")
    runs = root / "runs"
    reference = _train_process(str(data_dir), str(runs), "reference", str(root / "reference.log"))
    killed = _train_process(str(data_dir), str(runs), "killed", str(root / "killed.log"))
    processes = [reference, killed]
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
        # What a kill during a save leaves: a hidden temporary, which --resume must clean up.
        leftover = runs / "killed" / rundir.BACKUP / ".epoch_0003.npz.0badf00d.tmp.npz"
        leftover.write_bytes(b"half a backup")
        processes.append(_train_process(str(data_dir), str(runs), "killed", str(root / "resumed.log"), "--resume"))
        for process, log in ((reference, "reference.log"), (processes[-1], "resumed.log")):
            assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, \
                (root / log).read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return {"reference": str(runs / "reference"), "resumed": str(runs / "killed"), "rows_at_kill": rows_at_kill,
            "bad": bad, "data_dir": str(data_dir), "log": (root / "resumed.log").read_text(),
            "leftover": str(leftover)}


@pytest.mark.slow
def test_skip_trains_on_the_rest_and_lists_what_was_skipped(resumed):
    run_dir = resumed["reference"]
    skipped = read_rows(os.path.join(run_dir, rundir.SKIPPED_IMAGES))
    assert [row["path"] for row in skipped] == sorted(resumed["bad"])
    reasons = [row["reason"] for row in skipped]
    assert reasons == ["empty file (0 bytes)", "not an image but text starting 'not an image'"]
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["excluded_rows"]["unreadable, skipped (--on_bad_image=skip)"] == 2
    assert sum(metrics["images"]["train"].values()) + sum(metrics["images"]["val"].values()) == 28  # 30 - 2


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(resumed):
    """Bit-identical on CPU: every epoch is the same batches (``Datasets.epochs``), the backup
    holds weights and the optimizer's state (the weight averages too), the LR schedule, the frozen
    epochs and early stopping are functions of the epoch and the history. Tolerance: 1e-6 absolute
    on weights and metrics (observed: 0)."""
    assert resumed["rows_at_kill"] in (2, 3)  # killed once epoch 2 was backed up (epoch 3 may be logged)
    assert "Resuming" in resumed["log"]
    assert f"--resume: removed {resumed['leftover']}, left by a write that was killed" in resumed["log"]
    reference = read_rows(os.path.join(resumed["reference"], "history.csv"))
    history = read_rows(os.path.join(resumed["resumed"], "history.csv"))
    assert [row["epoch"] for row in history] == ["1", "2", "3", "4"]
    config = rundir.read_config(resumed["reference"])
    assert [float(row["learning_rate"]) for row in history] == pytest.approx(
        [optimizers.learning_rate_at(epoch, config) for epoch in range(4)])
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
    assert not os.path.exists(os.path.join(resumed["resumed"], rundir.BACKUP))


@pytest.mark.slow
def test_a_finished_run_is_never_resumed_or_touched(resumed):
    run_dir = resumed["reference"]
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    status, message = train_cli(*RESUME_FLAGS, f"--data_dir={resumed['data_dir']}",
                                f"--output_dir={os.path.dirname(run_dir)}", "--run_name=reference", "--resume")
    assert status == 1 and "has finished (it has metrics.json); start a new run instead" in message
    assert before == {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}


@pytest.mark.slow
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
