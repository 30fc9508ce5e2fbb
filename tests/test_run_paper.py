"""scripts/run_paper.py --dry_run checks the ImageNet weights of every experiment that will train (fast: no runs).

The sweep itself, and the plan's other checks, are in test_scripts (slow, with trained runs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import REPO_ROOT
from fake_runs import make_run

from xray_tf.backbones import BACKBONES


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


def test_dry_run_lists_every_experiment_whose_imagenet_weights_cannot_be_had(tmp_path):
    flags_dir = tmp_path / "flags"
    flags_dir.mkdir()
    for name, flags in {"res_imagenet": "--model=resnet50\n--weights=imagenet\n",
                        "res_scratch": "--model=resnet50\n--weights=none\n",
                        "dense_imagenet": "--model=densenet121\n--weights=imagenet\n"}.items():
        (flags_dir / f"{name}.cfg").write_text(flags)
    keras_home = tmp_path / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    (keras_home / "models" / os.path.basename(BACKBONES["densenet121"].imagenet_weights)).write_bytes(b"")  # cached
    # Offline, deterministically and without any outside connection: every download goes to a proxy that refuses.
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    env.update(KERAS_HOME=str(keras_home), https_proxy=f"http://127.0.0.1:{_closed_port()}")
    results = tmp_path / "results"
    make_run(results, "res_imagenet_seed0", 0, {"train": 0.9})  # finished: needs no weights any more
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "run_paper.py"), f"--results_dir={results}",
         f"--flags_dir={flags_dir}", "--experiments=res_imagenet,res_scratch,dense_imagenet", "--seeds=0,1",
         "--dry_run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""  # refused before any plan is printed
    problems = result.stderr.split("Nothing was run:\n")[1].strip().splitlines()
    assert len(problems) == 1, problems  # one per backbone; resnet50 from scratch and cached densenet121 pass
    assert problems[0].startswith("res_imagenet_seed1: --weights=imagenet: ")
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in problems[0] and "--weights=none" in problems[0]
    assert os.listdir(results) == ["res_imagenet_seed0"] and os.listdir(keras_home / "models") == [
        os.path.basename(BACKBONES["densenet121"].imagenet_weights)]  # nothing downloaded
