"""bnstats.onnx.check_export: an exported file against the model as it is now."""

from __future__ import annotations

import pytest

from tests.optional import optional_import

torch = pytest.importorskip("torch")
onnx = optional_import("onnx")
optional_import("onnxruntime")
optional_import("onnxscript")

from torch import nn  # noqa: E402

import bnstats.torch as bt  # noqa: E402
from bnstats.onnx import check_batchnorm_nodes, check_export, export_folded  # noqa: E402
from tests.onnx.models import Branching, ResNetish, TwoHeads, trained  # noqa: E402


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
    assert "the cause could not be located: no BN layer found stale, 1 not located (bn3)" in (
        check.message
    )
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
    with pytest.raises(ValueError, match="empty.onnx is empty, not an ONNX model"):
        check_export(empty, model, x)


def test_a_changed_small_output_is_not_hidden_by_a_large_one(tmp_path):
    """Logits around 1e3 and a head around 1e-3 whose BN (folded before its linear layer) was
    recalibrated after the export: the small head is off by about its own size."""
    x = torch.randn(2, 3, 16, 16)
    model = trained(TwoHeads(), x).eval()
    path = export_folded(model, x, tmp_path / "heads.onnx").path
    assert check_export(path, model, x).ok
    with torch.no_grad():
        model.bn.running_mean += 5.0
        model.bn.running_var *= 4.0
    check = check_export(path, model, x)
    assert [o.ok for o in check.agreement.outputs] == [True, False]
    assert not check.ok and check.stale == []
    assert "output 1 of 2: " in check.message
    # The BN folded before its layer is not read back from the graph: no claim it is current.
    assert "the cause could not be located: no BN layer found stale, 1 not located (bn)" in (
        check.message
    )
    (bn,) = [s for s in check.layers if s.layer == "bn"]
    assert bn.status == "not located" and bn.folded_into == "small"


def test_the_message_says_when_every_bn_layer_was_found_current(exported):
    model, path, x = exported
    with torch.no_grad():
        model.fc.bias += 1.0  # no BN in front of it: every BN layer is found current
    check = check_export(path, model, x)
    assert not check.ok and [s.status for s in check.layers] == ["current"] * 3
    assert "every BN layer was found with its current statistics" in check.message


def _untraceable_export(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = trained(Branching(), x).eval()
    path = tmp_path / "branching.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    return model, path, x


def test_a_model_torch_fx_cannot_trace_is_still_compared(tmp_path):
    model, path, x = _untraceable_export(tmp_path)
    check = check_export(path, model, x)
    assert check.ok, str(check)
    assert "cannot trace" in check.not_traced and check.layers == []
    assert "BN layers folded into weights not looked for (torch.fx cannot trace" in check.message
    assert check.to_dict()["not_traced"] == check.not_traced
    with torch.no_grad():
        model.bn.running_var *= 4.0
    changed = check_export(path, model, x)  # the exporter folded the BN into the conv
    assert not changed.ok and not changed.agreement.ok and changed.stale == []
    assert "the cause could not be located: torch.fx cannot trace the model" in changed.message


def test_a_model_that_is_one_bn_layer(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = trained(nn.BatchNorm2d(3), x).eval()
    path = tmp_path / "bn.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    nodes = check_batchnorm_nodes(path, model)
    assert nodes.ok and [n.layer for n in nodes.nodes] == [""], nodes.problems()
    check = check_export(path, model, x)
    assert check.ok and check.not_traced == "" and check.layers == [], str(check)
    with torch.no_grad():
        model.running_mean += 1.0
    check = check_export(path, model, x)
    assert check.stale == [""] and not check.ok
    assert "statistics look stale in 1 BN layer(s): <model>" in check.message
    assert "node '/BatchNormalization' (layer '<model>'): its running_mean" in str(check)
