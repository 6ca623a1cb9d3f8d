"""Files written atomically get the permissions ``open()`` would give them."""

from __future__ import annotations

import os
import stat

import pytest

from bnstats._files import STAGING_AFFIXES, atomic_write_bytes, check_name_fits


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Run the test under a chosen umask, restoring the old one afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_a_new_file_respects_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_bytes(tmp_path / "new.bin", b"data")
    with open(tmp_path / "reference.bin", "wb") as handle:
        handle.write(b"data")
    assert _mode(tmp_path / "new.bin") == _mode(tmp_path / "reference.bin") == 0o666 & ~mask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "kept.bin"
    target.write_bytes(b"old")
    target.chmod(0o644)
    atomic_write_bytes(target, b"new")
    assert _mode(target) == 0o644 and target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.bin"]


def test_a_name_too_long_for_its_staging_name_is_refused(tmp_path):
    """A name that fits the file system but not with ``.<name>.<random>.tmp`` around it would
    fail only when the file is written, after the work: refused up front, naming the option."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    fits = tmp_path / ("a" * (limit - STAGING_AFFIXES))
    check_name_fits("--out", fits)
    atomic_write_bytes(fits, b"data")  # what the check promises
    long = tmp_path / ("b" * (limit - STAGING_AFFIXES + 1))
    with pytest.raises(ValueError, match=rf"^--out bbbb.*: the name is {limit - 13} bytes"):
        check_name_fits("--out", long)
    with pytest.raises(OSError):
        atomic_write_bytes(long, b"data")
