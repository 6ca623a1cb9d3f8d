"""``bnstats fold --onnx`` and ``bnstats audit --onnx`` (bnstats.cli.onnx_commands), through
the command's ``main``
(tests/cli/test_torch_commands.py runs these commands as a separate process)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from bnstats.cli import main
from tests.optional import optional_import

torch = pytest.importorskip("torch")
onnx = optional_import("onnx")
ort = optional_import("onnxruntime")
optional_import("onnxscript")

USER_MODULE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
        nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[4].running_var.uniform_(0.5, 2)
    return model
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "onnxmodels.py").write_text(textwrap.dedent(USER_MODULE))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.normal(size=(12, 2, 6, 6)).astype(np.float32))
    return tmp_path


def _model(project):
    namespace: dict = {}
    exec((project / "onnxmodels.py").read_text(), namespace)
    return namespace["make"]().eval()


def test_fold_writes_a_checked_onnx_file_that_audit_accepts(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    model = ["--model", "onnxmodels.py:make", "--data", "data.npz"]
    assert main(["fold", *model, "--out", "f.pt", "--onnx", "f.onnx", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["onnx"]
    assert summary["batchnorm_nodes"]["nodes"] == []
    assert summary["max_abs_error"] <= 1e-5 * summary["output_scale"]
    graph = onnx.load(str(project / "f.onnx"))
    assert "BatchNormalization" not in {node.op_type for node in graph.graph.node}
    session = ort.InferenceSession(str(project / "f.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(project / "data.npz")["X"][:5]  # exported from a batch of 12: any batch size
    with torch.no_grad():
        expected = _model(project)(torch.from_numpy(x)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert main(["audit", *model, "--onnx", "f.onnx"]) == 0
    assert "f.onnx computes the model's eval output" in capsys.readouterr().out


def test_audit_flags_an_export_in_training_mode_with_status_1(project, monkeypatch, capsys):
    model = _model(project).train()
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(
            model,
            (torch.randn(2, 2, 6, 6),),
            str(project / "t.onnx"),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    monkeypatch.chdir(project)
    args = ["audit", "--model", "onnxmodels.py:make", "--data", "data.npz", "--onnx", "t.onnx"]
    assert main([*args, "--json"]) == 1
    check = json.loads(capsys.readouterr().out)["onnx"]
    assert not check["ok"]
    nodes = check["batchnorm_nodes"]["nodes"]
    assert [node["layer"] for node in nodes] == ["1", "4"]
    assert all(node["training_mode"] for node in nodes)
    assert main(args) == 1
    text = capsys.readouterr().out
    assert text.count("training mode") >= 2 and "(layer '1'): training mode" in text


def test_fold_onnx_without_data_is_one_line_and_writes_nothing(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["fold", "--model", "onnxmodels.py:make", "--out", "f.pt", "--onnx", "f.onnx"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "bnstats: error: --onnx needs --data: the export is checked on its first batch"
    )
    assert not (project / "f.pt").exists() and not (project / "f.onnx").exists()
