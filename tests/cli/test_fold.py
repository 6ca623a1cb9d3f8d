"""``bnstats fold`` (bnstats.cli.fold): its words without ``--data``, its output paths
checked before any work, and the ``.pt`` and ``.onnx`` written together or not at all."""

from __future__ import annotations

import sys

import pytest

from bnstats.cli import main
from tests.optional import optional_import

torch = pytest.importorskip("torch")

from tests.cli.user_project import stale_weights  # noqa: E402

MODEL = ["--model", "usermodels.py:make"]


def _files(folder) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "__pycache__"
    }


def _refused(folder, capsys, args: list[str], message: str) -> None:
    """``bnstats *args`` exits 2 with one line holding ``message`` and changes no file."""
    before = _files(folder)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert _files(folder) == before


def test_without_data_the_advice_is_to_give_data(project_here, capsys):
    args = ["fold", "--model", "usermodels.py:broken", "--out", "f.pt"]  # Linear -> BatchNorm1d
    assert main(args) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "pass example_inputs" not in text and "need example_inputs" not in text
    assert "kept    1 (BatchNorm1d) [needs_example_inputs]" in captured.out
    assert "give --data so that it can check the shape" in captured.out
    assert captured.err == (
        "bnstats: warning: 1 BatchNorm layer(s) kept because only --data shows whether "
        "their dim 1 is the neighbouring layer's channels: 1\n"
    )


def test_an_out_name_too_long_for_the_file_system_writes_nothing(project_here, capsys):
    long_name = "f" * 300 + ".pt"  # beyond the 255 bytes a name may have
    args = ["fold", *MODEL, "--data", "data.npz", "--out", long_name, "--onnx", "f.onnx"]
    _refused(project_here, capsys, args, "the name is 303 bytes; at most 241 fit here")
    assert not (project_here / "f.onnx").exists()


def test_a_missing_onnx_folder_is_found_before_any_work(project_here, capsys, monkeypatch):
    monkeypatch.setattr("bnstats.cli.fold.load_inputs", _never_called)
    args = ["fold", *MODEL, "--data", "data.npz", "--out", "f.pt", "--onnx", "no/f.onnx"]
    _refused(project_here, capsys, args, "--onnx no/f.onnx: directory no does not exist")


def _never_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["fold", *MODEL, "--out", "usermodels.py"],
            "--out usermodels.py is the --model file usermodels.py",
        ),
        (
            ["fold", *MODEL, "--data", "data.npz", "--out", "data.npz"],
            "--out data.npz is the --data file data.npz",
        ),
        (
            ["fold", *MODEL, "--weights", "weights.pt", "--out", "./weights.pt"],
            "--out ./weights.pt is the --weights file weights.pt",
        ),
        (
            ["fold", *MODEL, "--data", "data.npz", "--out", "x", "--onnx", "x"],
            "--onnx x is also --out; give two different names",
        ),
        (
            ["recalibrate", *MODEL, "--data", "usermodels.py:batches", "--out", "usermodels.py"],
            "--out usermodels.py is the --model file usermodels.py",
        ),
    ],
    ids=["model-file", "data", "weights", "out-is-onnx", "recalibrate-model-file"],
)
def test_an_output_naming_an_input_is_refused(project_here, capsys, args, message):
    stale_weights(project_here)
    _refused(project_here, capsys, args, message)


def test_an_output_naming_an_imported_model_module_is_refused(cli, project_here):
    """``--model usermodels:make`` names no file: the module's file is known once imported."""
    before = _files(project_here)
    result = cli("fold", "--model", "usermodels:make", "--out", "usermodels.py", cwd=project_here)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--out usermodels.py is the --model file" in result.stderr
    assert _files(project_here) == before


@pytest.fixture
def onnx_installed():
    for name in ("onnx", "onnxruntime", "onnxscript"):
        optional_import(name)


def test_a_failure_after_the_export_leaves_neither_file(
    project_here, capsys, monkeypatch, onnx_installed
):
    def full_disk(torch, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bnstats.cli.fold.saved_bytes", full_disk)
    args = ["fold", *MODEL, "--data", "data.npz", "--out", "f.pt", "--onnx", "f.onnx"]
    _refused(project_here, capsys, args, "No space left on device")
    assert not any(p.name.endswith(".tmp") for p in project_here.iterdir())


def test_both_files_replace_older_ones_together(project_here, capsys, onnx_installed):
    (project_here / "f.pt").write_bytes(b"old")
    (project_here / "f.onnx").write_bytes(b"old")
    args = ["fold", *MODEL, "--data", "data.npz", "--out", "f.pt", "--onnx", "f.onnx"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wrote f.onnx:" in out and ".tmp" not in out
    assert (project_here / "f.pt").read_bytes() != b"old" != (project_here / "f.onnx").read_bytes()
    assert not any(p.name.startswith(".") for p in project_here.iterdir())


CUSTOM = """
import torch
from torch import nn

class MyBN(nn.BatchNorm1d):
    pass

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), MyBN(16), nn.ReLU(), nn.Linear(16, 4))
"""


@pytest.mark.parametrize("file", ["custom.py", "my-model.py"])
def test_a_kept_class_defined_in_the_model_file_is_saved_by_its_module_name(
    tmp_path, monkeypatch, capsys, file
):
    """``--model custom.py:build`` loads the file as module ``custom``, so the folded model's
    kept ``MyBN`` pickles as ``custom.MyBN``, as with ``--model custom:build``; a file whose
    stem is no module name gives one line saying what to do."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / file).write_text(CUSTOM)
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(0).normal(size=(20, 8)))
    status = main(["fold", "--model", f"{file}:build", "--data", "data.npz", "--out", "f.pt"])
    err = capsys.readouterr().err
    if file == "my-model.py":
        assert status == 2 and err.count("\n") == 1 and "torch.save cannot pickle" in err
        assert "--model module:factory" in err and not (tmp_path / "f.pt").exists()
        return
    assert status == 0, err
    assert "custom" not in sys.modules and str(tmp_path) not in sys.path  # as before the call
    monkeypatch.syspath_prepend(str(tmp_path))
    folded = torch.load(tmp_path / "f.pt", weights_only=False)
    assert [type(m).__module__ for m in folded.modules() if "MyBN" in type(m).__name__] == [
        "custom"
    ]
