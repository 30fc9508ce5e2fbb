"""The commands: one pattern, fast --help without TensorFlow, flagfiles from anywhere, clean output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from xray_tf import cli

# What each command's --help is asked through: the module a console script runs, and the aliases.
_HELP_PROBE = """
import sys
sys.argv = [{program!r}, "--help"]
import importlib
try:
    importlib.import_module({module!r}).main()
except SystemExit as exit_:
    code = exit_.code
print("EXIT", code, "tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_exits_0_without_importing_tensorflow(command):
    module, _ = cli.COMMANDS[command]
    probe = _HELP_PROBE.format(program=f"xray-{command}", module=module)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "EXIT 0 False False", result.stdout + result.stderr
    assert "--" in result.stdout  # the command's own flags are listed


def test_python_m_xray_tf_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "xray_tf"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in cli.COMMANDS:
        assert f"xray-{command}" in result.stdout
    unknown = subprocess.run([sys.executable, "-m", "xray_tf", "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "Unknown command 'nope'" in unknown.stdout


def test_python_m_xray_tf_train_help_lists_the_training_flags():
    result = subprocess.run([sys.executable, "-m", "xray_tf.train", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--learning_rate" in result.stdout and "--experiment" in result.stdout


def _train(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xray_tf.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_paper_flagfiles_resolve_their_includes_from_anywhere(tmp_path):
    # --epochs=0 stops the run at validation: the flagfile and its include were read by then.
    from_root = _train("--flagfile=flags/prfl.cfg", "--epochs=0", f"--output_dir={tmp_path}", cwd=REPO_ROOT)
    elsewhere = _train("--experiment=prfl", "--epochs=0", f"--output_dir={tmp_path}", cwd=str(tmp_path))
    for result in (from_root, elsewhere):
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == "xray-train: error: --epochs=0: must be positive."
    missing = _train("--flagfile=no/such.cfg", cwd=str(tmp_path))
    assert missing.returncode == 1 and "--flagfile=no/such.cfg: cannot be read" in missing.stderr


def test_tensorflow_start_up_noise_is_kept_out(tmp_path):
    result = _train(f"--data_dir={tmp_path / 'nowhere'}", f"--output_dir={tmp_path}", cwd=str(tmp_path))
    assert result.returncode == 1
    # Only the project's own lines: the error, logged and then as the exit message.
    first, last = result.stderr.strip().splitlines()
    assert first.endswith(f"] data_dir={str(tmp_path / 'nowhere')!r}: not a directory."), first
    assert last == f"xray-train: error: --data_dir={tmp_path / 'nowhere'}: not a directory."


def test_library_errors_become_one_line_naming_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xray_tf", "evaluate", f"--run_dir={tmp_path / 'none'}"],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"xray-evaluate: error: --run_dir={tmp_path / 'none'}: not a directory."
