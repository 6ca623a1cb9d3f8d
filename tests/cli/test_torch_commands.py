"""``bnstats audit | recalibrate | fold`` on a user's model, run as a separate process."""

from __future__ import annotations

import importlib.util
import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

USER_MODULE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    return model

def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, generator=gen) * 2 + 1, torch.zeros(n)) for n in (5, 9, 4)]

def broken():
    return nn.Sequential(nn.Linear(7, 2), nn.BatchNorm1d(2))

instance = make()
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODULE))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=(rng.normal(size=(30, 2, 6, 6)) * 2 + 1).astype(np.float32))
    return tmp_path


def _user_module(project):
    """The test's usermodels.py, imported here without touching sys.path or sys.modules."""
    spec = importlib.util.spec_from_file_location("usermodels_here", project / "usermodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale_weights(project):
    """A checkpoint whose running statistics are wrong: still at their start, 0 and 1."""
    model = _user_module(project).make()
    with torch.no_grad():
        model[1].weight.mul_(1.5)
    torch.save(model.state_dict(), project / "weights.pt")
    return model


def test_audit_prints_a_table_and_json(cli, project):
    _stale_weights(project)
    args = ["audit", "--model", "usermodels:make", "--weights", "weights.pt", "--data", "data.npz"]
    result = cli(*args, "--batch-size", "8", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "1" in result.stdout and "4" in result.stdout  # layer names of the Sequential
    result = cli(*args, "--json", cwd=project)
    report = json.loads(result.stdout)
    assert [layer["name"] for layer in report["layers"]] == ["1", "4"]
    assert report["samples"] == 30 or report["batches"] == 1


def test_audit_writes_an_html_page(cli, project):
    result = cli(
        "audit", "--model", "usermodels:make", "--data", "data.npz", "--out", "page", cwd=project
    )
    assert result.returncode == 0, result.stderr
    page = (project / "page" / "audit.html").read_text()
    assert "data:image/png;base64," in page and "never_updated" in page


def test_recalibrate_writes_exact_statistics(cli, project):
    model = _stale_weights(project)
    result = cli(
        "recalibrate",
        "--model",
        "usermodels.py:make",
        "--weights",
        "weights.pt",
        "--data",
        "usermodels:batches",
        "--out",
        "new.pt",
        "--json",
        cwd=project,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [row["name"] for row in summary["layers"]] == ["1", "4"]
    state = torch.load(project / "new.pt", weights_only=True)
    # the first BN's input does not depend on how batches are normalized: check it exactly
    inputs = torch.cat([x for x, _ in _user_module(project).batches()]).double()
    z = model[0].double()(inputs)
    expected_var = z.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    torch.testing.assert_close(state["1.running_var"].double(), expected_var, rtol=1e-5, atol=1e-7)


def test_fold_writes_a_module_with_the_same_outputs(cli, project):
    model = _stale_weights(project)
    result = cli(
        "fold",
        "--model",
        "usermodels:make",
        "--weights",
        "weights.pt",
        "--data",
        "data.npz",
        "--out",
        "folded.pt",
        "--json",
        cwd=project,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["max_relative_difference"] < 1e-5
    folded = torch.load(project / "folded.pt", weights_only=False)
    x = torch.randn(3, 2, 6, 6)
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "--model", "nomodule:make", "--data", "data.npz"], "cannot import 'nomodule'"),
        (
            ["audit", "--model", "usermodels:nothing", "--data", "data.npz"],
            "has no attribute 'nothing'",
        ),
        (["audit", "--model", "usermodels", "--data", "data.npz"], "must look like"),
        (
            ["audit", "--model", "usermodels:make", "--data", "missing.npz"],
            "no such file missing.npz",
        ),
        (
            ["audit", "--model", "usermodels:make", "--data", "data.npz", "--data-key", "Y"],
            "no array Y",
        ),
        (
            ["audit", "--model", "usermodels:make", "--weights", "data.npz", "--data", "data.npz"],
            "data.npz",
        ),
        (["audit", "--model", "usermodels:broken", "--data", "data.npz"], "audit: RuntimeError"),
        (
            [
                "recalibrate",
                "--model",
                "usermodels:make",
                "--data",
                "data.npz",
                "--out",
                "no/dir/x.pt",
            ],
            "does not exist",
        ),
        (["recalibrate", "--model", "usermodels:make", "--data", "data.npz"], "--out"),
        (["fold", "--model", "usermodels:instance", "--out", "."], "is a directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, project, args, message):
    result = cli(*args, cwd=project)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (project / "no").exists()


def test_wrong_weights_file_names_the_file_and_writes_nothing(cli, project):
    torch.save({"0.weight": torch.zeros(1)}, project / "other.pt")
    result = cli(
        "recalibrate",
        "--model",
        "usermodels:make",
        "--weights",
        "other.pt",
        "--data",
        "data.npz",
        "--out",
        "new.pt",
        cwd=project,
    )
    assert result.returncode == 2 and "other.pt does not fit the model" in result.stderr
    assert not (project / "new.pt").exists()


def test_max_samples_cuts_tensor_batches():
    from bnstats.cli.torch_commands import _limited

    batches = [torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)]
    assert [len(b) for b in _limited(batches, 6)] == [4, 2]
    assert _limited(batches, None) is batches
    with pytest.raises(ValueError, match="at least 1"):
        _limited(batches, 0)
