"""The package as a user gets it: build the sdist and wheel, install the wheel into a fresh virtual
environment, and run the demo and a prediction from another directory, with no source tree in sight.

The environment borrows this one's dependencies (TensorFlow, Keras, ...) through a path file, so
nothing is downloaded; that file adds the directories only, so this environment's editable
install of xray_tf (a path hook of its own) stays invisible, and a check says so.
"""

from __future__ import annotations

import glob
import os
import stat
import subprocess
import sys
import tarfile
import venv

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """The ``bin/`` folder of a fresh virtual environment holding the wheel built from the sdist."""
    root = tmp_path_factory.mktemp("packaging")
    _run([sys.executable, "-m", "build", "--no-isolation", f"--outdir={root / 'dist'}", REPO_ROOT], cwd=REPO_ROOT)
    (sdist,) = glob.glob(str(root / "dist" / "*.tar.gz"))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "flags/prfl.cfg", "flags/common_paper.cfg", "scripts/run_paper.py"} <= names
    (wheel,) = glob.glob(str(root / "dist" / "*.whl"))

    environment = root / "venv"
    venv.create(environment, with_pip=False)
    python = str(environment / "bin" / "python")
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=str(root)).stdout.strip()
    borrowed = [path for path in sys.path if path.endswith("site-packages") and os.path.isdir(path)]
    with open(os.path.join(site_packages, "_borrowed_dependencies.pth"), "w") as handle:
        handle.write("\n".join(borrowed) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=str(root))
    where = _run([python, "-c", "import xray_tf; print(xray_tf.__file__, xray_tf.__version__)"], cwd=str(root))
    assert where.stdout.startswith(site_packages), where.stdout  # the wheel's copy, not the checkout
    return str(environment / "bin")


def test_installed_commands_train_the_demo_and_predict_from_anywhere(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()

    def private_files(umask: int = 0o077) -> None:
        os.umask(umask)

    # The cheapest backbone: what is tested is the installed command, not the network.
    _run([os.path.join(installed, "xray-train"), "--experiment=demo", "--epochs=1", "--image_size=32",
          "--model=mobilenetv3small", "--output_dir=runs"], cwd=str(work), preexec_fn=private_files)
    run_dir = work / "runs" / "demo"
    for path in [run_dir, *run_dir.rglob("*")]:  # the run's files keep the umask's permissions
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    images = sorted(glob.glob(os.path.join(os.environ["XRAY_TF_CACHE"], "synthetic-v1", "**", "*.jpeg"),
                          recursive=True))[:3]
    predicted = _run([os.path.join(installed, "xray-predict"), "--model=runs/demo", *images], cwd=str(work))
    rows = predicted.stdout.strip().splitlines()
    assert rows[0].startswith("file,predicted_class,p_normal") and len(rows) == 1 + len(images)
    listing = _run([os.path.join(installed, "python"), "-m", "xray_tf"], cwd=str(work))
    assert "xray-evaluate" in listing.stdout
