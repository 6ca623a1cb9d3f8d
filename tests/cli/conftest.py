"""Run the ``bnstats`` command as a user does: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("BNSTATS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "bnstats", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def project_here(tmp_path, monkeypatch):
    """The user's project of ``tests/cli/user_project.py`` in ``tmp_path``, which is made the
    working directory (for ``main`` called in this process)."""
    from tests.cli.user_project import make_project

    monkeypatch.chdir(tmp_path)
    return make_project(tmp_path)
