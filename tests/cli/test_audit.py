"""``bnstats audit --strict`` (bnstats.cli.audit): exit status 1 when any layer is flagged,
for CI pipelines; through the command's ``main``."""

from __future__ import annotations

import json

import pytest

from bnstats.cli import main

torch = pytest.importorskip("torch")

from tests.cli.user_project import stale_weights  # noqa: E402

AUDIT = ["audit", "--model", "usermodels.py:make", "--data", "data.npz"]


def test_strict_exits_1_when_a_layer_is_flagged(project_here, capsys):
    stale_weights(project_here)  # running statistics never updated: every layer is flagged
    assert main([*AUDIT, "--weights", "weights.pt"]) == 0
    capsys.readouterr()
    assert main([*AUDIT, "--weights", "weights.pt", "--strict"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("--strict: 2 flagged: 1, 4")
    assert main([*AUDIT, "--weights", "weights.pt", "--strict", "--json"]) == 1
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert all(layer["flags"] for layer in layers)


def test_strict_exits_0_after_recalibrating(project_here, capsys):
    stale_weights(project_here)
    common = ["--model", "usermodels.py:make", "--weights", "weights.pt", "--data", "data.npz"]
    assert main(["recalibrate", *common, "--out", "new.pt"]) == 0
    capsys.readouterr()
    assert main([*AUDIT, "--weights", "new.pt", "--strict", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [layer["flags"] for layer in layers] == [[], []]


def test_one_batch_gives_an_infinite_relative_error_printed_as_inf(project_here, capsys):
    """With one batch there is no spread between batches: the error is inf, not 1.8e+308."""
    assert main([*AUDIT, "--batch-size", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("1 ", "4 "))]
    assert len(rows) == 2 and all(" inf" in row and "e+308" not in row for row in rows)
    assert main([*AUDIT, "--batch-size", "64", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [layer["relative_standard_error"] for layer in layers] == [None, None]


@pytest.mark.parametrize("command", ["audit", "diagnose"])
@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("data.npz/sub", "--out data.npz/sub: directory data.npz does not exist"),
        ("missing/sub", "--out missing/sub: directory missing does not exist"),
        ("", "--out is empty"),
    ],
)
def test_out_is_checked_before_any_work_as_recalibrate_checks_it(
    project_here, capsys, command, out, message
):
    """A folder that cannot be made (under a file, or whose parent is missing) is refused
    before the data are read (this data source raises when called), and nothing is made."""
    before = sorted(p.name for p in project_here.iterdir())
    args = [command, "--model", "usermodels.py:make", "--data", "usermodels.py:failing_batches"]
    assert main([*args, "--out", out]) == 2
    assert capsys.readouterr().err == f"bnstats: error: {message}" + (
        f"; give the folder to write {command}.html in\n" if not out else "\n"
    )
    assert sorted(p.name for p in project_here.iterdir()) == before
