"""The run directory: atomic writes that keep the umask's permissions, names that never collide, readers."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from xray_tf import rundir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_trees_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        run_dir = rundir.create(str(tmp_path / "runs"), "run")
        rundir.write_text(os.path.join(run_dir, rundir.FLAGS), "--epochs=1\n")
        rundir.write_json(os.path.join(run_dir, rundir.CLASSES), ["a", "b"])

        def fill(folder: str) -> None:
            os.mkdir(os.path.join(folder, "variables"))
            with open(os.path.join(folder, "variables", "data"), "w") as handle:
                handle.write("x")

        rundir.write_atomic(os.path.join(run_dir, rundir.SAVED_MODEL), fill, directory=True)
    finally:
        os.umask(previous)
    assert _mode(run_dir) == dir_mode
    assert _mode(os.path.join(run_dir, rundir.FLAGS)) == file_mode
    assert _mode(os.path.join(run_dir, rundir.CLASSES)) == file_mode
    assert _mode(os.path.join(run_dir, rundir.SAVED_MODEL)) == dir_mode
    assert _mode(os.path.join(run_dir, rundir.SAVED_MODEL, "variables", "data")) == file_mode
    assert sorted(os.listdir(run_dir)) == [rundir.CLASSES, rundir.FLAGS, rundir.SAVED_MODEL]  # no temporaries


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "history.csv"
    rundir.write_text(str(path), "old\n")

    def fail(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write("half")
        raise OSError(28, "No space left on device")

    message = rf"^cannot write {path} \(the epoch history\): No space left on device\.$"
    with pytest.raises(rundir.RunError, match=message):
        rundir.write_atomic(str(path), fail)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["history.csv"]


def test_temporaries_keep_the_ending_that_picks_a_format(tmp_path):
    seen = []
    for name in ("model.keras", "b.weights.h5"):
        rundir.write_atomic(str(tmp_path / name), lambda temp: seen.append(temp) or open(temp, "w").close())
    assert seen[0].endswith(".keras") and seen[1].endswith(".weights.h5")
    assert all(os.path.basename(name).startswith(".") for name in seen)


def test_create_never_reuses_a_name(tmp_path):
    first = rundir.create(str(tmp_path), "demo")
    second = rundir.create(str(tmp_path), "demo")
    assert (os.path.basename(first), os.path.basename(second)) == ("demo", "demo-2")


def test_readers_name_the_file(tmp_path):
    with pytest.raises(rundir.RunError, match="flags.txt: no such file"):
        rundir.read_config(str(tmp_path))
    (tmp_path / rundir.HISTORY).write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(rundir.RunError, match="missing column"):
        rundir.read_history(str(tmp_path))
    pd.DataFrame({"epoch": [1], "loss": [0.5], "accuracy": [0.6], "val_loss": [0.7], "val_accuracy": [0.5]}).to_csv(
        tmp_path / rundir.HISTORY, index=False)
    assert rundir.read_history(str(tmp_path))["val_loss"].tolist() == [0.7]
    (tmp_path / rundir.FLAGS).write_text("--epochs=2\n--seed=4\n")
    assert rundir.read_config(str(tmp_path)).seed == 4
    (tmp_path / rundir.METRICS).write_text("{not json")
    with pytest.raises(rundir.RunError, match="not valid JSON"):
        rundir.read_metrics(str(tmp_path))


def _predictions(**changes) -> pd.DataFrame:
    """Two images' predictions as xray-evaluate writes them, with patients, one flag and ``changes``."""
    table = pd.DataFrame({"file": ["/d/a.png", "/d/b.png"], "true_class": ["A", "B"], "predicted_class": ["A", "A"],
                          "p_a": [0.9, 0.6], "p_b": [0.1, 0.4], "patient": [12, 7], "flag_b": [0, 1]})
    return table.assign(**changes)


def test_read_predictions_gives_evaluates_columns(tmp_path):
    _predictions(note="x").iloc[:, ::-1].to_csv(tmp_path / rundir.predictions_of_split("val"), index=False)
    frame = rundir.read_predictions(str(tmp_path), "val", ["p_a", "p_b"])
    assert list(frame.columns) == ["file", "true_class", "predicted_class", "p_b", "p_a", "patient", "flag_b"]
    assert frame["patient"].tolist() == ["12", "7"]  # text, whatever the file's digits
    _predictions().drop(columns=["patient", "flag_b"]).to_csv(tmp_path / rundir.predictions_of_split("test"),
                                                              index=False)
    assert list(rundir.read_predictions(str(tmp_path), "test", ["p_a"]).columns) == [
        "file", "true_class", "predicted_class", "p_a", "p_b"]


@pytest.mark.parametrize("table, message", [
    (None, "no such file"),
    (_predictions().drop(columns=["p_b"]), r"missing column\(s\) p_b"),
    (_predictions().rename(columns={"true_class": "label", "predicted_class": "predicted"}),
     r"missing column\(s\) true_class, predicted_class"),  # names that never shipped
    (_predictions(file="/d/a.png"), "/d/a.png appears more than once"),
])
def test_read_predictions_names_the_file(tmp_path, table, message):
    if table is not None:
        table.to_csv(tmp_path / rundir.predictions_of_split("test"), index=False)
    with pytest.raises(rundir.RunError, match=f"predictions_test.csv: {message}"):
        rundir.read_predictions(str(tmp_path), "test", ["p_a", "p_b"])
