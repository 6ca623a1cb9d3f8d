"""The output folder is replaced as one, also where folders cannot be swapped atomically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bnstats import _output_set
from bnstats._output_set import check_output_folder, one_generation, remove_leftovers


def _write(folder, **files):
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("exchange", [True, False])
def test_the_new_set_replaces_the_old_one(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_output_set, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    _write(out, a="old", b="old")
    with one_generation(out) as staging:
        _write(staging, a="new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_error_keeps_the_old_set(tmp_path):
    out = tmp_path / "out"
    _write(out, a="old")
    with pytest.raises(RuntimeError), one_generation(out) as staging:
        _write(staging, a="new")
        raise RuntimeError("disk full")
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    out = tmp_path / "out"
    _write(tmp_path / ".out.k3.old.tmp", a="old")
    _write(tmp_path / ".out.k4.new.tmp", a="new, maybe half")
    remove_leftovers(out)
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda out: out.write_text("x"), "is a file, not a folder"),
        (lambda out: _write(out, notes="x"), "holds files a run did not write (notes)"),
        (lambda out: out.parent.joinpath("f").write_text("x"), "is a file, not a folder"),
    ],
)
def test_unusable_folders_are_refused(tmp_path, setup, message):
    out = tmp_path / "out"
    setup(out)
    target = tmp_path / "f" / "run" if (tmp_path / "f").exists() else out
    with pytest.raises(ValueError, match=re.escape(message)):
        check_output_folder(target, ["a"])
    _write(tmp_path / "fine", a="x", **{".a.123.tmp": "half"})
    assert check_output_folder(tmp_path / "fine", ["a"]) == tmp_path / "fine"


def test_the_working_folder_is_refused(tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for out in (".", "..", str(tmp_path / "a")):
        with pytest.raises(ValueError, match="holds the working folder"):
            check_output_folder(out, ["a"])
    assert check_output_folder("run", ["a"]) == Path("run")


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): what it is and what it holds."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            entries[key] = "link to " + str(Path(path.readlink()))
        elif path.is_dir():
            entries[key] = "folder"
        else:
            entries[key] = path.read_text()
    return entries


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlinked_output_is_refused_before_anything_is_touched(tmp_path, dangling):
    """A link to a previous run (or to nothing) is refused by the check and by the swap
    itself, and the link, the folder it points to and their parent are left as found."""
    run = tmp_path / "run-1"
    if not dangling:
        _write(run, a="old")
    link = tmp_path / "link"
    link.symlink_to(run.name, target_is_directory=True)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"--out .*link is a symbolic link \(to run-1\)"):
        check_output_folder(link, ["a"])
    with pytest.raises(ValueError, match="is a symbolic link"), one_generation(link) as staging:
        _write(staging, a="new")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("setup", "shown"),
    [
        (lambda out: _write(out / "a", thesis="mine"), "a"),  # a folder named like an output
        (lambda out: (out / "a").symlink_to("../elsewhere"), "a"),
        (lambda out: _write(out / ".backup.tmp", d="mine"), ".backup.tmp"),
        (lambda out: (out / ".notes.tmp").write_text("mine"), ".notes.tmp"),
        (lambda out: _write(out / ".a.x1.tmp", d="mine"), ".a.x1.tmp"),  # a folder, not staging
    ],
)
def test_only_regular_files_a_run_writes_count_as_its_own(tmp_path, setup, shown):
    """The swap deletes the old folder: anything a run did not write there is refused."""
    out = tmp_path / "out"
    out.mkdir()
    setup(out)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"holds files a run did not write ({shown})")):
        check_output_folder(out, ["a"])
    assert _snapshot(tmp_path) == before


def test_a_read_only_folder_and_an_empty_name_are_refused(tmp_path):
    out = tmp_path / "out"
    _write(out, a="old")
    out.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"--out .*out: the folder is read-only"):
            check_output_folder(out, ["a"])
    finally:
        out.chmod(0o755)
    with pytest.raises(ValueError, match="--out is empty"):
        check_output_folder("", ["a"])


def test_leftovers_are_only_the_runs_own_staging_folders(tmp_path):
    """A user's hidden sibling ``.out.backup.tmp`` is not a staging folder of a run."""
    out = tmp_path / "out"
    _write(tmp_path / ".out.backup.tmp", d="mine")
    _write(tmp_path / ".out.k4.new.tmp", a="half")
    remove_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.backup.tmp"]
