"""Shared fixtures: tiny synthetic datasets and the optional real data beside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xray_tf import synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def shared_data(name: str) -> str:
    """Path of ``../shared/data/<name>``, or skip the test when this machine does not have it."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"real data {path} is absent (only on the project's development machines)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A small synthetic CoronaHack-layout dataset (all four classes, TRAIN and TEST)."""
    out = tmp_path_factory.mktemp("data") / "coronahack"
    return synthetic.write_dataset(str(out), num_train=80, num_test=24, seed=1, min_size=40, max_size=72)


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` from the repo root and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
