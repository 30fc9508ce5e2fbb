"""Hostile image files and destinations: each is refused by name, nothing hangs, nothing is lost.

FIFOs, sockets, devices, directories and symlink loops named like images; headers that declare
23000 x 23000 pixels (never allocated: the files are a few hundred bytes); headers that declare
more rows than their data holds; and ``xray-predict`` writing to a directory, into a file, onto a
full disk. The library cases run here; the ``xray-predict`` cases run in one child process
(``_drive``, below), because absl cannot define xray-predict's flags beside xray-train's, which
test_training imports into this one. The child also bounds every case in time: a FIFO that were
opened would block it, and ``subprocess.run``'s timeout turns that into a failure, not a hang.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import socket
import subprocess
import sys
import threading
import traceback

import keras
import pytest
from conftest import REPO_ROOT
from image_files import ramp, write_jpeg_claiming, write_png_claiming
from PIL import Image

from xray_tf import image_cache, image_headers, predict, rundir

BUDGET_WORDS = ("header declares 23000 x 23000 = 529 megapixels, above --max_pixels=100000000; "
                "raise --max_pixels to decode it")


@contextlib.contextmanager
def unblocking(fifos: list[str], seconds: float = 30.0):
    """Open the write end of each FIFO if the block has not finished after ``seconds``, so that a reader
    blocked on one returns and the test fails instead of hanging; yields the event that says it had to."""
    done, had_to = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(seconds):
            had_to.set()
            for fifo in fifos:
                with contextlib.suppress(OSError):  # ENXIO: no reader on it
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield had_to
    finally:
        done.set()
        watcher.join()


# ---------------------------------------------------------------------------------------------
# Image files: training's check (image_cache) and predict's decoding say what each one is


def _good(folder) -> str:
    path = str(folder / "good.png")
    Image.fromarray(ramp(), "L").save(path)
    return path


def test_a_fifo_named_like_an_image_is_named_and_never_opened(tmp_path):
    fifo, good = str(tmp_path / "x.jpeg"), _good(tmp_path)
    os.mkfifo(fifo)
    with unblocking([fifo]) as had_to:
        assert image_cache.find_unreadable([good, fifo], 32) == {fifo: "is a FIFO (named pipe)"}
        assert predict.decode_file(fifo, 32) == (None, "is a FIFO (named pipe)")
        assert predict.find_images([fifo]) == [fifo]  # kept, to be reported in its row
    assert not had_to.is_set(), "the FIFO was opened"


def test_a_directory_named_like_an_image_is_named(tmp_path):
    folder = tmp_path / "x.jpeg"
    folder.mkdir()
    inner = _good(folder)
    assert image_cache.find_unreadable([str(folder)], 32) == {str(folder): "is a directory"}
    assert predict.find_images([str(folder)]) == [inner]  # given to predict, a folder is searched


def test_symlink_loops_and_broken_symlinks_are_named(tmp_path):
    loop, broken = str(tmp_path / "loop.jpeg"), str(tmp_path / "broken.png")
    os.symlink(loop, loop)
    os.symlink(str(tmp_path / "gone.png"), broken)
    assert image_cache.find_unreadable([loop, broken], 32) == {
        loop: "is a symlink loop", broken: f"is a broken symlink to {tmp_path / 'gone.png'}"}
    assert predict.find_images([loop, broken]) == [loop, broken]  # reported in their rows, not "no such file"
    with pytest.raises(FileNotFoundError, match="gone.png: no such file or folder"):
        predict.find_images([str(tmp_path / "gone.png")])


def test_sockets_and_devices_are_named(tmp_path):
    path = str(tmp_path / "s.png")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        assert image_cache.find_unreadable([path, os.devnull], 32) == {path: "is a socket", os.devnull: "is a device"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its permissions")
def test_a_file_without_read_permission_is_named(tmp_path):
    path = _good(tmp_path)
    os.chmod(path, 0)
    assert image_cache.find_unreadable([path], 32) == {path: "cannot be read: permission denied"}


@pytest.mark.parametrize("kind", ["png_16_bit_rgba", "jpeg"])
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(kind, tmp_path, monkeypatch):
    """The issue's 16-bit RGBA PNG of 23000 x 23000 would take 4 GB to decode: it is refused from its header."""
    huge, good = str(tmp_path / "huge.png"), _good(tmp_path)
    if kind == "jpeg":
        write_jpeg_claiming(huge, 23000, 23000)
    else:
        write_png_claiming(huge, 23000, 23000, bit_depth=16, colour_type=6)
    decoded, decode_pass = [], image_cache._decode_pass
    monkeypatch.setattr(image_cache, "_decode_pass", lambda paths, rows, *rest: (
        decoded.extend(paths[row] for row in rows), decode_pass(paths, rows, *rest)))
    assert image_cache.find_unreadable([good, huge], 32) == {huge: BUDGET_WORDS}
    assert decoded == [good]
    assert predict.decode_file(huge, 32) == (None, BUDGET_WORDS)


def test_a_jpeg_header_declaring_more_rows_than_its_data_is_caught(tmp_path):
    """libjpeg would fill the missing rows with grey and TensorFlow return them as the image."""
    lie = str(tmp_path / "lie.jpeg")
    write_jpeg_claiming(lie, height=640)
    words = "header declares 64 x 640 but the data ends early (truncated?)"
    assert image_cache.find_unreadable([lie], 32) == {lie: words}
    assert predict.decode_file(lie, 32) == (None, words)


def test_a_png_header_declaring_more_rows_than_its_data_is_caught(tmp_path):
    lie = str(tmp_path / "lie.png")
    write_png_claiming(lie, 64, 640, rows=20)
    reason = image_cache.find_unreadable([lie], 32)[lie]
    assert reason.startswith("PNG file that does not decode (corrupt or truncated?)")


def test_predict_decodes_files_that_may_take_much_memory_alone(tmp_path, monkeypatch):
    """Within a batch, a file above its share of image_headers.DECODE_MEMORY waits for the others and is
    decoded by itself."""
    small = [str(tmp_path / f"s{i}.png") for i in range(3)]
    for path in small:
        Image.fromarray(ramp(), "L").save(path)
    big = str(tmp_path / "big.png")
    Image.fromarray(ramp(300, 200), "L").save(big)
    monkeypatch.setattr(image_headers, "DECODE_MEMORY", predict._DECODE_THREADS * 20_000)
    threads, decode_checked = {}, predict._decode_checked

    def recorded(path, check, image_size):
        threads[path] = threading.current_thread().name
        return decode_checked(path, check, image_size)

    monkeypatch.setattr(predict, "_decode_checked", recorded)
    with predict.ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
        decoded = predict._decode_files(pool, small + [big], 32, 10**6)
    assert [error for _, error in decoded] == [None] * 4
    assert threads[big] == threading.current_thread().name and all(threads[p].startswith("pool") for p in small)


# ---------------------------------------------------------------------------------------------
# xray-predict: each case runs in one child process (see the module docstring)


class _FillingDisk(io.TextIOBase):
    """A text file that takes ``flushes`` flushes, then fails the next with ENOSPC, losing what was not flushed."""

    def __init__(self, path: str, flushes: int):
        self.file, self.flushes, self.pending = open(path, "w", newline="", encoding="utf-8"), flushes, []

    def write(self, text: str) -> int:
        self.pending.append(text)
        return len(text)

    def flush(self) -> None:
        if self.flushes == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.flushes -= 1
        self.file.write("".join(self.pending))
        self.file.flush()
        self.pending = []

    def close(self) -> None:
        self.file.close()
        super().close()


def _open_for_case(case: dict):
    """The ``open`` xray-predict gets in a case: one whose disk fills, or one without permission."""
    def fake_open(path: str, *args, **kwargs):
        if "refuse_open" in case:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return _FillingDisk(path, case["flushes_before_full"])
    return fake_open


def _drive(cases_json: str, results_json: str) -> None:
    """Run each case's xray-predict arguments in this process; write {case: {code, stderr}} as JSON."""
    from xray_tf.cli import predict as cli_predict

    results = {}
    for name, case in json.loads(open(cases_json).read()).items():
        stderr, code = io.StringIO(), None
        if "refuse_open" in case or "flushes_before_full" in case:
            cli_predict.open = _open_for_case(case)
        try:
            argv = cli_predict.FLAGS(["xray-predict", *case["args"]])
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                cli_predict.run_command(argv)
        except SystemExit as exit_:
            if isinstance(exit_.code, str):  # the message Python prints before exiting with status 1
                stderr.write(exit_.code + "\n")
            code = 1 if isinstance(exit_.code, str) else exit_.code
        except BaseException:  # noqa: BLE001  (reported to the test, which fails on it)
            stderr.write(traceback.format_exc())
            code = "no exit status: an exception escaped"
        finally:
            cli_predict.FLAGS.unparse_flags()
            vars(cli_predict).pop("open", None)
        results[name] = {"code": code, "stderr": stderr.getvalue()}
    rundir.write_json(results_json, results)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, str]:
    """A model (a 32 px run directory) and the files of every case."""
    root = tmp_path_factory.mktemp("hostile")
    run = root / "run"
    run.mkdir()
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="softmax")])
    model.save(run / rundir.MODEL)
    rundir.write_json(str(run / rundir.CLASSES), ["Normal", "Bacteria", "Virus", "COVID-19"])
    inbox = root / "inbox"
    (inbox / "dir.jpeg").mkdir(parents=True)
    paths = {"run": str(run), "inbox": str(inbox), "root": str(root)}
    for name, folder in (("good", root), ("good2", root), ("a", inbox), ("inner", inbox / "dir.jpeg")):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(ramp(), "L").save(paths[name])
    for name, folder in (("fifo", root), ("x", inbox)):
        paths[name] = str(folder / f"{name}.jpeg")
        os.mkfifo(paths[name])
    paths["loop"] = str(inbox / "loop.jpeg")
    os.symlink(paths["loop"], paths["loop"])
    paths["huge"] = str(inbox / "huge.png")
    write_png_claiming(paths["huge"], 23000, 23000, bit_depth=16, colour_type=6)
    paths["lie"] = str(inbox / "lie.jpeg")
    write_jpeg_claiming(paths["lie"], height=640)
    (root / "out_dir").mkdir()
    (root / "a_file").write_text("not a folder")
    return paths


@pytest.fixture(scope="module")
def runs(scans) -> dict[str, dict]:
    """Exit status and stderr of xray-predict in each case."""
    root, model = scans["root"], f"--model={scans['run']}"
    cases = {
        "fifo_argument": {"args": [model, f"--output={root}/fifo.csv", scans["good"], scans["fifo"]]},
        "folder": {"args": [model, f"--output={root}/folder.csv", scans["inbox"]]},
        "output_is_a_directory": {"args": [model, f"--output={root}/out_dir", f"--gradcam_dir={root}/new_cams",
                                           scans["good"]]},
        "gradcam_dir_is_a_file": {"args": [model, f"--output={root}/cams.csv", f"--gradcam_dir={root}/a_file",
                                           scans["good"]]},
        "disk_fills": {"args": [model, f"--output={root}/full.csv", "--batch_size=1", scans["good"], scans["good2"],
                                scans["a"]], "flushes_before_full": 2},
        "permission_denied": {"args": [model, f"--output={root}/denied.csv", scans["good"]], "refuse_open": True},
    }
    cases_json, results_json = os.path.join(root, "cases.json"), os.path.join(root, "results.json")
    rundir.write_json(cases_json, cases)
    child = subprocess.run([sys.executable, __file__, cases_json, results_json], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=180)
    assert child.returncode == 0 and "Traceback" not in child.stderr, child.stderr[-3000:]
    return rundir.read_json(results_json)


def _rows(path: str) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def _ends_with_one_error(run: dict, line: str) -> None:
    assert run["code"] == 1 and "Traceback" not in run["stderr"], run
    assert run["stderr"].rstrip("\n").splitlines()[-1] == line


def test_predict_reports_a_fifo_argument_and_predicts_the_rest(runs, scans):
    run, rows = runs["fifo_argument"], _rows(os.path.join(scans["root"], "fifo.csv"))
    assert run["code"] == 1 and "Traceback" not in run["stderr"], run
    assert rows[scans["fifo"]]["error"] == "is a FIFO (named pipe)" and rows[scans["fifo"]]["p_normal"] == ""
    assert rows[scans["good"]]["error"] == "" and rows[scans["good"]]["predicted_class"] in ("Normal", "Bacteria",
                                                                                               "Virus", "COVID-19")
    assert f"  {scans['fifo']}: is a FIFO (named pipe)\n" in run["stderr"]


@pytest.mark.parametrize("culprit, words", [("x", "is a FIFO (named pipe)"), ("loop", "is a symlink loop"),
                                            ("huge", BUDGET_WORDS),
                                            ("lie", "header declares 64 x 640 but the data ends early (truncated?)")])
def test_predict_reports_hostile_files_found_in_a_folder(runs, scans, culprit, words):
    run, rows = runs["folder"], _rows(os.path.join(scans["root"], "folder.csv"))
    assert run["code"] == 1 and "Traceback" not in run["stderr"], run
    assert rows[scans[culprit]]["error"] == words
    assert f"  {scans[culprit]}: {words}\n" in run["stderr"]
    assert rows[scans["a"]]["error"] == rows[scans["inner"]]["error"] == ""  # the folder named dir.jpeg is searched
    assert "xray-predict: 2 of 6 files predicted; 4 could not be read:" in run["stderr"]


def test_predict_refuses_an_output_that_is_a_directory_before_writing_anything(runs, scans):
    out_dir = os.path.join(scans["root"], "out_dir")
    _ends_with_one_error(runs["output_is_a_directory"],
                         f"xray-predict: error: cannot write {out_dir} (the predictions CSV): Is a directory.")
    assert os.listdir(out_dir) == [] and not os.path.exists(os.path.join(scans["root"], "new_cams"))


def test_predict_refuses_a_gradcam_dir_that_is_a_file_before_writing_anything(runs, scans):
    a_file = os.path.join(scans["root"], "a_file")
    _ends_with_one_error(runs["gradcam_dir_is_a_file"],
                         f"xray-predict: error: cannot write {a_file} (the Grad-CAM folder): Not a directory.")
    assert not os.path.exists(os.path.join(scans["root"], "cams.csv")) and open(a_file).read() == "not a folder"


def test_predict_keeps_the_rows_written_before_the_disk_filled(runs, scans):
    full = os.path.join(scans["root"], "full.csv")
    _ends_with_one_error(runs["disk_fills"],
                         f"xray-predict: error: cannot write {full} (the predictions CSV): No space left on device.")
    assert list(_rows(full)) == [scans["good"]]  # the header and the first batch, flushed before the disk filled


def test_predict_names_an_output_it_may_not_write(runs, scans):
    denied = os.path.join(scans["root"], "denied.csv")
    _ends_with_one_error(runs["permission_denied"],
                         f"xray-predict: error: cannot write {denied} (the predictions CSV): Permission denied.")
    assert not os.path.exists(denied)


if __name__ == "__main__":
    _drive(*sys.argv[1:])
