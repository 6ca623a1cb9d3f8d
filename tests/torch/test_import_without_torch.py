"""``import bnstats.torch`` without PyTorch: one line saying what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

_HIDE_TORCH = "import sys; sys.modules['torch'] = None  # what a missing torch looks like\n"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", _HIDE_TORCH + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_import_without_torch_says_what_to_install():
    result = _python(
        "try:\n"
        "    import bnstats.torch\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error, sep=': ')\n"
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.count("\n") == 0 and message.startswith("ImportError: bnstats.torch needs")
    assert 'pip install ".[torch]"' in message and "_pass" not in message


def test_the_numpy_core_still_imports_without_torch():
    result = _python("import bnstats, bnstats.engine, bnstats.conventions; print('ok')")
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
