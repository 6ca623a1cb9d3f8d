"""``bnstats demo --out DIR`` replaces DIR's files as one set: killed or failing, a rerun
leaves DIR holding one complete generation, the old one or the new one."""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bnstats import cli
from bnstats.engine import Network
from bnstats.engine.training import History
from tests.cli.conftest import SRC, run_cli

QUICK = ["--epochs", "2", "--hidden", "16,8"]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


def _demo(out, seed: str) -> list[str]:
    return ["demo", *QUICK, "--seed", seed, "--out", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two complete runs, seeds 0 and 1, and how long the second took."""
    root = tmp_path_factory.mktemp("runs")
    assert run_cli(*_demo(root / "old", "0")).returncode == 0
    started = time.monotonic()
    assert run_cli(*_demo(root / "new", "1")).returncode == 0
    return root, time.monotonic() - started


@pytest.fixture
def generations(runs, tmp_path):
    """``tmp_path/old`` holding the seed-0 run; both runs' files; the second run's time."""
    root, seconds = runs
    shutil.copytree(root / "old", tmp_path / "old")
    return _snapshot(root / "old"), _snapshot(root / "new"), seconds


def test_a_killed_rerun_leaves_one_complete_generation(tmp_path, generations):
    old, new, seconds = generations
    assert old != new and set(old) == set(new) == {
        "history.npz",
        "summary.json",
        "network.npz",
        "report.html",
    }
    out = tmp_path / "out"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    for fraction in (0.4, 0.8, 0.9, 0.95, 1.0):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp_path / "old", out)  # the previous run's files
        process = subprocess.Popen(
            [sys.executable, "-m", "bnstats", *_demo(out, "1")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        time.sleep(fraction * seconds)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert _snapshot(out) in (old, new), f"a mix of generations after {fraction:.0%}"
    result = run_cli(*_demo(out, "1"))
    assert result.returncode == 0, result.stderr
    assert _snapshot(out) == new and _leftovers(tmp_path) == []


def test_a_failing_rerun_keeps_the_previous_set(tmp_path, generations, monkeypatch, capsys):
    old, _, _ = generations

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bnstats.cli.demo.write_demo_report", full_disk)
    assert cli.main(_demo(tmp_path / "old", "1")) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _snapshot(tmp_path / "old") == old and _leftovers(tmp_path) == []


def test_a_rerun_removes_what_killed_runs_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".history.npz.x1y2.tmp").write_bytes(b"half")
    (tmp_path / ".out.abc.new.tmp").mkdir()
    (tmp_path / ".out.abc.new.tmp" / "history.npz").write_bytes(b"half")
    result = run_cli(*_demo(out, "0"))
    assert result.returncode == 0, result.stderr
    assert _leftovers(tmp_path) == [] and len(list(out.iterdir())) == 4
    history = History.load(out / "history.npz")
    summary = History.load_summary(out / "summary.json")
    assert summary["steps"] == history.steps and summary["config"]["seed"] == 0
    assert [bn.name for bn in Network.load(out / "network.npz").batchnorm_layers] == ["bn1", "bn2"]


def test_a_folder_holding_other_files_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli(*_demo(out, "0"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "holds files a run did not write (notes.txt)" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and result.stdout == ""


def test_a_symlinked_out_is_refused_and_nothing_is_left_behind(tmp_path, generations):
    """``--out link`` where ``link`` points to a previous run: exit 2 with one line, before
    training; the link, the run it points to and the parent folder are as they were."""
    old, _, _ = generations
    (tmp_path / "link").symlink_to("old", target_is_directory=True)
    entries = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(*_demo(tmp_path / "link", "1"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is a symbolic link (to old); give the folder itself" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == entries and result.stdout == ""
    assert (tmp_path / "link").is_symlink() and _snapshot(tmp_path / "old") == old
    assert _leftovers(tmp_path) == []


def test_user_entries_named_like_outputs_are_refused_and_kept(tmp_path):
    """A folder of the user's called history.npz, or a hidden .backup.tmp, is not a file the
    run wrote: the swap would delete it, so the run is refused before training."""
    out = tmp_path / "out"
    (out / "history.npz").mkdir(parents=True)
    (out / "history.npz" / "thesis.tex").write_text("precious")
    (out / ".backup.tmp").mkdir()
    result = run_cli(*_demo(out, "0"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "holds files a run did not write (.backup.tmp, history.npz)" in result.stderr
    assert (out / "history.npz" / "thesis.tex").read_text() == "precious"
    assert (out / ".backup.tmp").is_dir() and result.stdout == ""


def test_a_read_only_out_folder_is_refused_before_training(tmp_path, generations):
    old, _, _ = generations
    (tmp_path / "old").chmod(0o555)
    try:
        result = run_cli(*_demo(tmp_path / "old", "1"))
    finally:
        (tmp_path / "old").chmod(0o755)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "old: the folder is read-only" in result.stderr and result.stdout == ""
    assert _snapshot(tmp_path / "old") == old


def test_an_empty_out_is_refused(tmp_path):
    result = run_cli("demo", *QUICK, "--out", "", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "bnstats: error: --out is empty; give the folder to write in\n"
    assert list(tmp_path.iterdir()) == [] and result.stdout == ""


def test_a_folder_name_without_room_for_the_staging_folder_is_refused(tmp_path):
    result = run_cli("demo", *QUICK, "--out", "d" * 240, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--out dddd" in result.stderr and "the name is 240 bytes" in result.stderr
    assert list(tmp_path.iterdir()) == []
