"""Resolving a user's model, weights and batches (bnstats.cli.loading), in process."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bnstats.cli.loading import load_batches, load_model, resolve

torch = pytest.importorskip("torch")


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "things.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))\n"
        "def batches():\n    return [torch.ones(4, 3), torch.zeros(2, 3)]\n"
        "def empty():\n    return []\n"
        "def fails():\n    raise RuntimeError('boom')\n"
        "number = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_module_and_file_references(user_file):
    assert callable(resolve("things:make", "--model"))
    assert resolve(f"{user_file / 'things.py'}:number", "--data") == 3
    model = load_model("things.py:make")
    assert isinstance(model, torch.nn.Module)


def test_weights_load_strictly(user_file):
    model = load_model("things:make")
    torch.save({"state_dict": model.state_dict()}, user_file / "w.pt")
    load_model("things:make", "w.pt")
    torch.save({"0.weight": torch.zeros(2, 3)}, user_file / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt does not fit the model"):
        load_model("things:make", "partial.pt")
    (user_file / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable PyTorch checkpoint"):
        load_model("things:make", "junk.pt")


def test_batches_from_npz_and_from_a_callable(user_file):
    np.savez(user_file / "d.npz", inputs=np.arange(30, dtype=np.float64).reshape(10, 3))
    batches = load_batches("d.npz", 4)
    assert [len(b) for b in batches] == [4, 4, 2] and batches[0].dtype == torch.float32
    assert [len(b) for b in load_batches("things:batches")] == [4, 2]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: load_model("things:number"), "neither a module nor callable"),
        (lambda: load_model("things:batches"), "gave a list, not a torch.nn.Module"),
        (lambda: load_model("things:fails"), "raised RuntimeError: boom"),
        (lambda: load_model("missing.py:make"), "no such file"),
        (lambda: load_batches("things:empty"), "gave no batches"),
        (lambda: load_batches("things:number"), "gave a int, not batches"),
        (lambda: load_batches("d.npz", 0), "--batch-size must be at least 1"),
    ],
)
def test_errors_are_one_clear_value_error(user_file, call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_npz_with_nan_is_refused(user_file):
    np.savez(user_file / "nan.npz", X=np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="nan.npz: inputs hold NaN"):
        load_batches("nan.npz", 2)


EXITING = """
import sys
import torch
from torch import nn

def quits():
    sys.exit(0)  # success, for a shell: bnstats must not end with it

class Quitter(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        sys.exit(4)

def quitter():
    return Quitter()
"""


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "exit_on_import.py:make",
            "--model: importing exit_on_import.py failed: sys.exit(3) was called at ",
        ),
        ("exiting.py:quits", "--model 'exiting.py:quits' failed: sys.exit(0) was called at"),
        ("exiting.py:quitter", "audit: sys.exit(4) was called at"),
    ],
    ids=["on-import", "in-factory", "in-forward"],
)
def test_sys_exit_in_the_model_code_is_one_line_naming_the_file(cli, tmp_path, reference, message):
    (tmp_path / "exit_on_import.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "exiting.py").write_text(EXITING)
    np.savez(tmp_path / "data.npz", X=np.ones((4, 2, 3, 3), dtype=np.float32))
    result = cli("audit", "--model", reference, "--data", "data.npz", cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert reference.partition(":")[0] + ":" in result.stderr  # file:line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: np.save(p.open("wb"), np.zeros((10, 3))), "is not a .npz archive but a single"),
        (lambda p: p.write_text("hello"), r"is not a .npz archive \(it starts with b'hell'\)"),
        (lambda p: p.mkdir(), "is a directory, not a .npz file"),
        (
            lambda p: np.savez(p, X=np.array([[1], [2, 3]], dtype=object)),
            "array X holds Python objects",
        ),
    ],
)
def test_npz_that_numpy_cannot_read_safely_is_named(user_file, write, message):
    """No allow_pickle advice from numpy, no TypeError: one line naming the file."""
    write(user_file / "bad.npz")
    with pytest.raises(ValueError, match=f"^bad.npz:? {message}"):
        load_batches("bad.npz", 4)


def test_weights_without_num_batches_tracked_load_as_torch_loads_them(user_file):
    """A checkpoint from before torch 0.4.1 has no BN num_batches_tracked: torch's strict
    load fills it in, so --weights does too; where torch refuses, the message names it."""
    model = load_model("things:make")
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, user_file / "old.pt")
    loaded = load_model("things:make", "old.pt")
    assert int(loaded[1].num_batches_tracked) == 0
    assert torch.equal(loaded[1].running_var, model[1].running_var)
    current = model.state_dict()  # its metadata says version 2: torch wants the key
    del current["1.num_batches_tracked"]
    torch.save(current, user_file / "current.pt")
    with pytest.raises(ValueError, match=r"current.pt does not fit .*1\.num_batches_tracked"):
        load_model("things:make", "current.pt")


def test_a_factory_may_import_sibling_modules_when_called(tmp_path, monkeypatch, capsys):
    """The file's folder stays on sys.path while the command runs (factory, batches,
    forward), as for ``python sub/model.py``, and is taken off afterwards."""
    from bnstats.cli import main

    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "helpers.py").write_text(
        "from torch import nn\n"
        "def make():\n    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))\n"
    )
    (sub / "model_lazy.py").write_text(
        "def build():\n    from helpers import make\n    return make()\n"
    )
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(0).normal(size=(10, 3)))
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "--model", "sub/model_lazy.py:build", "--data", "d.npz"]) == 0, (
        capsys.readouterr().err
    )
    assert str(sub) not in sys.path and "helpers" in sys.modules
    sys.modules.pop("helpers")
