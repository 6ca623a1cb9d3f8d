"""bnstats.onnx.check_export: an exported file against the model as it is now."""

from __future__ import annotations

import pytest

from tests.optional import optional_import

torch = pytest.importorskip("torch")
onnx = optional_import("onnx")
optional_import("onnxruntime")
optional_import("onnxscript")

import bnstats.torch as bt  # noqa: E402
from bnstats.onnx import check_batchnorm_nodes, check_export  # noqa: E402
from tests.onnx.models import ResNetish, trained  # noqa: E402


@pytest.fixture
def exported(tmp_path):
    """A trained ResNetish, its plain export with torch's default exporter, and an input."""
    x = torch.randn(4, 3, 8, 8)
    model = trained(ResNetish(), x).eval()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(path))
    return model, path, x


def test_a_plain_export_has_no_bn_node_and_matches_the_model(exported):
    model, path, x = exported
    model.train()
    graph = onnx.load(str(path))
    assert "BatchNormalization" not in {n.op_type for n in graph.graph.node}  # torch folded BN
    check = check_export(path, model, x)
    assert check.ok and check.stale == [], str(check)
    assert [s.status for s in check.layers] == ["current"] * 3
    assert check.message.startswith(f"{path} computes the model's eval output")
    assert "3 folded BN layer(s) found with their current statistics" in check.message
    assert all(m.training for m in model.modules())  # left as found


def test_recalibrated_statistics_are_found_stale_where_the_node_check_sees_nothing(exported):
    model, path, x = exported
    bt.recalibrate(model, [torch.randn(8, 3, 8, 8) for _ in range(3)])
    assert check_batchnorm_nodes(path, model).ok  # no node: nothing to compare
    check = check_export(path, model, x)
    assert not check.ok and not check.agreement.ok
    assert check.stale == ["bn1", "bn2", "bn3"]
    assert "\n" not in check.message
    assert "differs from the model's eval output" in check.message
    assert "statistics look stale in 3 BN layer(s): bn1, bn2, bn3" in check.message
    assert check.to_dict()["stale"] == ["bn1", "bn2", "bn3"]


def test_a_changed_mean_alone_is_found_in_the_folded_bias(exported):
    model, path, x = exported
    with torch.no_grad():
        model.bn2.running_mean += 0.5
    check = check_export(path, model, x)
    assert check.stale == ["bn2"]
    (bn2,) = [s for s in check.layers if s.layer == "bn2"]
    assert bn2.folded_into == "conv2" and "folded bias" in bn2.detail


def test_a_changed_weight_is_not_blamed_on_statistics(exported):
    model, path, x = exported
    with torch.no_grad():
        model.conv3.weight += 0.05 * torch.randn_like(model.conv3.weight)
    check = check_export(path, model, x)
    assert not check.ok and check.stale == []
    assert "no BN layer's statistics look stale" in check.message
    assert [s.status for s in check.layers] == ["current", "current", "not located"]


def test_bn_nodes_kept_by_the_torchscript_exporter_are_compared(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = trained(ResNetish(), x).eval()
    path = tmp_path / "ts.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    assert check_export(path, model, x).ok
    with torch.no_grad():
        model.bn1.running_var *= 2
    check = check_export(path, model, x)
    assert check.stale == ["bn1"] and not check.ok


def test_a_file_that_is_no_model_is_refused(tmp_path, exported):
    model, _, x = exported
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.onnx is not an ONNX model"):
        check_export(empty, model, x)
