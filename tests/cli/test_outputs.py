"""Output files written together (bnstats.cli.outputs): never an old file beside a new one."""

from __future__ import annotations

import os

import pytest

from bnstats.cli import outputs
from bnstats.cli.outputs import written_together


@pytest.mark.parametrize("failing", ["pair.pt", "pair.onnx"])
def test_an_interrupted_rename_leaves_no_old_file_beside_a_new_one(tmp_path, monkeypatch, failing):
    """Ctrl-C (or a full disk) between the renames: the .onnx may be missing, but the old
    .onnx never stays beside the new .pt."""
    pt, onnx = tmp_path / "pair.pt", tmp_path / "pair.onnx"
    pt.write_text("OLD PT")
    onnx.write_text("OLD ONNX")
    real = os.replace

    def interrupted(src, dst):
        if str(dst).endswith(failing):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), written_together([pt, onnx]) as staging:
        staging[pt].write_text("NEW PT")
        staging[onnx].write_text("NEW ONNX")
    state = (pt.read_text() if pt.exists() else None, onnx.read_text() if onnx.exists() else None)
    expected = ("OLD PT", None) if failing == "pair.pt" else ("NEW PT", None)
    assert state == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (pt, onnx) if p.exists()
    ), "no staging file is left"


def test_a_failure_before_the_renames_changes_nothing(tmp_path):
    pt, onnx = tmp_path / "a.pt", tmp_path / "a.onnx"
    pt.write_text("OLD PT")
    onnx.write_text("OLD ONNX")
    with pytest.raises(RuntimeError), written_together([pt, onnx]) as staging:
        staging[pt].write_text("NEW PT")
        raise RuntimeError("export failed")
    assert (pt.read_text(), onnx.read_text()) == ("OLD PT", "OLD ONNX")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.pt"]
