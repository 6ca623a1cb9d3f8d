"""bnstats.onnx against torch.onnx.export's real graphs and onnxruntime."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.doc_examples import run_section_examples
from tests.optional import optional_import

torch = pytest.importorskip("torch")
onnx = optional_import("onnx")
ort = optional_import("onnxruntime")
optional_import("onnxscript")  # torch's default (dynamo) exporter needs it

from torch import nn  # noqa: E402

from bnstats.conventions import convert_momentum  # noqa: E402
from bnstats.onnx import OnnxExportError, check_batchnorm_nodes, export_folded  # noqa: E402


class Net(nn.Module):
    """BN after a conv, before a conv (no padding: exact), and after a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5, momentum=0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.conv2(self.bn2(x)).mean(dim=(2, 3))
        return self.bn3(self.fc(x))


def _trained(model: nn.Module, x) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(x * 2 + 1 + torch.randn_like(x))
    return model


def _bn_op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if "Normalization" in n.op_type]


def test_export_folded_leaves_no_bn_node_and_onnxruntime_matches_torch(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = _trained(Net(), x)  # left in training mode: the export must use eval mode
    state = copy.deepcopy(model.state_dict())
    result = export_folded(model, x, tmp_path / "net.onnx")
    assert _bn_op_types(result.path) == []
    assert len(result.fold_report.folded) == 3
    # An independent check: onnxruntime on the file against torch's eval output.
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    one = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]  # dynamic batch
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
        np.testing.assert_allclose(one, model(x[:1]).numpy(), rtol=1e-5, atol=1e-5)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    assert result.max_abs_error <= 1e-5 * result.output_scale
    assert result.output_scale == pytest.approx(scale)
    # The model was left as found.
    model.train()
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert "3 of 3 BN layer(s) folded, 0 BatchNormalization node(s) left" in str(result)


def test_a_bn_that_cannot_fold_stays_as_an_inference_node(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, eps=1e-3)).eval()
    x = torch.randn(2, 3, 6, 6)
    result = export_folded(model, x, tmp_path / "kept.onnx", optimize=False)
    assert _bn_op_types(result.path) == ["BatchNormalization"]
    (node,) = result.batchnorm_nodes.nodes
    assert node.layer == "2" and not node.training_mode and node.problems == ()
    assert node.epsilon == pytest.approx(1e-3)
    assert "1 BatchNormalization node(s) left" in str(result)


def test_a_failed_check_writes_nothing(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = _trained(Net(), x)
    target = tmp_path / "net.onnx"
    with pytest.raises(OnnxExportError, match="differs from torch's eval output.*nothing"):
        export_folded(model, x, target, rtol=1e-15)  # float32 rounding exceeds it
    assert list(tmp_path.iterdir()) == []


def _legacy_export(model, x, path, **kwargs):
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
    return onnx.load(str(path))


def test_a_training_mode_export_is_caught(tmp_path):
    """torch's TorchScript exporter, told to preserve training mode, emits training_mode=1."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).train()
    graph = _legacy_export(
        model,
        torch.randn(2, 3, 6, 6),
        tmp_path / "t.onnx",
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    check = check_batchnorm_nodes(graph)
    assert not check.ok
    assert check.nodes[0].training_mode
    assert "training mode" in check.problems()[0]


def test_eps_and_stale_statistics_are_compared_with_the_layers(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    model = _trained(model, torch.randn(2, 3, 6, 6)).eval()
    path = tmp_path / "m.onnx"
    graph = _legacy_export(model, torch.randn(2, 3, 6, 6), path)
    check = check_batchnorm_nodes(path, model)
    assert check.ok and check.nodes[0].layer == "2", check.problems()
    (node,) = [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    momentum = onnx.helper.get_attribute_value(
        next(a for a in node.attribute if a.name == "momentum")
    )
    # The exporter writes torch's momentum in ONNX's meaning, as bnstats.conventions does.
    expected = convert_momentum(0.3, source="torch", target="onnx")
    assert momentum == pytest.approx(expected)
    # An exporter writing ONNX's default eps (1e-5) for a 1e-3 layer:
    for attribute in node.attribute:
        if attribute.name == "epsilon":
            attribute.f = 1e-5
    with torch.no_grad():
        model[2].running_mean += 1.0  # the model changed after the export
    (line_eps, line_stale) = check_batchnorm_nodes(graph, model).problems()
    assert "(layer '2'): epsilon 1e-05 but the layer's eps is 0.001" in line_eps
    assert "running_mean differs from the layer's" in line_stale
    other = nn.Sequential(nn.BatchNorm2d(4))
    assert "matches no BN layer" in check_batchnorm_nodes(graph, other).problems()[-1]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        check_batchnorm_nodes(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ValueError, match="broken.onnx is not an ONNX model"):
        check_batchnorm_nodes(broken)


def test_the_example_in_docs_integrations_md_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_section_examples("integrations.md", "Exporting to ONNX")
    assert "0 BatchNormalization node(s) left" in capsys.readouterr().out
