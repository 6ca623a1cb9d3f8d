"""``bnstats demo --out DIR`` writes report.html; without matplotlib it says so in one line."""

from __future__ import annotations

import pytest

from tests.cli.conftest import run_cli
from tests.report.test_html import parse

QUICK = ["--epochs", "2", "--hidden", "16,8"]
OTHER_FILES = {"history.npz", "summary.json", "network.npz"}


def test_out_writes_the_report_of_the_chosen_layer(tmp_path):
    out = tmp_path / "run"
    result = run_cli("demo", *QUICK, "--report-layer", "bn2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {*OTHER_FILES, "report.html"}
    assert "report.html" in result.stdout and result.stderr == ""
    page = (out / "report.html").read_text()
    assert len([a for tag, a in parse(page).tags if tag == "img"]) == 4
    assert "Layer bn2, units 0, 1, 2 of its 8" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--report-layer", "bn3", "--out", "OUT"],
            "no BatchNorm layer named 'bn3'; the network's BatchNorm layers are bn1, bn2",
        ),
        (["--report-layer", "bn1"], "--report-layer needs --out DIR"),
    ],
)
def test_bad_report_layer_is_refused_before_training(tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = run_cli("demo", *QUICK, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists(), "nothing is trained or written"


def test_without_matplotlib_the_other_files_are_written(tmp_path, monkeypatch):
    """A ``matplotlib`` that fails to import, first on the path, stands for a missing one."""
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    out = tmp_path / "run"
    result = run_cli("demo", *QUICK, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == OTHER_FILES
    assert result.stderr.count("\n") == 1, result.stderr
    assert 'report.html needs matplotlib: pip install ".[report]"' in result.stderr
    assert "report.html" not in result.stdout and "Traceback" not in result.stderr
