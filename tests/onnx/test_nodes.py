"""bnstats.onnx.check_batchnorm_nodes on exported graphs, hand-built graphs and bad files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optional import optional_import

torch = pytest.importorskip("torch")
onnx = optional_import("onnx")
optional_import("onnxruntime")
optional_import("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from bnstats.conventions import convert_momentum  # noqa: E402
from bnstats.onnx import check_batchnorm_nodes, export_folded  # noqa: E402
from tests.onnx.models import trained  # noqa: E402
from tests.torch import timm_patterns as tp  # noqa: E402


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
    model = trained(model, torch.randn(2, 3, 6, 6)).eval()
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


@pytest.mark.parametrize(
    "data", [b"", b"\x08\x07\x12\x03abc"], ids=["empty", "ir-version-and-producer-only"]
)
def test_an_empty_or_garbage_file_is_refused_naming_it(tmp_path, data):
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with pytest.raises(
        ValueError,
        match=r"model.onnx is (empty, not an ONNX model|not an ONNX model: it has no .*node)",
    ):
        check_batchnorm_nodes(path)
    with pytest.raises(ValueError, match=r"<ModelProto> is not an ONNX model"):
        check_batchnorm_nodes(onnx.load_from_string(data))


def _bn(name, x, y, prefix, training=0, epsilon=1e-5):
    inputs = [x] + [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    return helper.make_node(
        "BatchNormalization", inputs, [y], name=name, epsilon=epsilon, training_mode=training
    )


def _statistics(prefix, channels=4):
    values = {"weight": 1.0, "bias": 0.0, "running_mean": 0.5, "running_var": 2.0}
    return [
        numpy_helper.from_array(np.full(channels, v, np.float32), f"{prefix}.{k}")
        for k, v in values.items()
    ]


def test_bn_nodes_inside_if_and_loop_bodies_are_checked():
    """An If whose then-branch normalizes the graph's input in training mode, and a Loop whose
    body does so to its carried value: both found, named by where they sit."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    then_branch = helper.make_graph(
        [_bn("bn_then", "x", "then_y", "a", training=1)], "then", [], [out_named("then_y")]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [out_named("else_y")]
    )
    branch = helper.make_node(
        "If", ["cond"], ["picked"], name="if0", then_branch=then_branch, else_branch=else_branch
    )
    body = helper.make_graph(
        [
            _bn("bn_loop", "carried", "carried_out", "b", training=1),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, None),
        ],
        [out_named("cond_out", TensorProto.BOOL), out_named("carried_out")],
    )
    loop = helper.make_node("Loop", ["trips", "", "picked"], ["out"], name="loop0", body=body)
    trips = numpy_helper.from_array(np.array(2, np.int64), "trips")
    graph = helper.make_graph(
        [branch, loop], "g", [x, cond], [out], [trips, *_statistics("a"), *_statistics("b")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    check = check_batchnorm_nodes(model)
    assert [n.node for n in check.nodes] == ["if0/then_branch/bn_then", "loop0/body/bn_loop"]
    assert all(n.training_mode for n in check.nodes) and not check.ok
    assert check.weight_standardization == []


def out_named(name, kind=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, kind, None)


def test_a_non_numeric_epsilon_names_the_file_and_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    node = _bn("bn7", "x", "y", "a")
    for attribute in node.attribute:
        if attribute.name == "epsilon":
            attribute.CopyFrom(helper.make_attribute("epsilon", "tiny"))
    graph = helper.make_graph([node], "g", [x], [y], _statistics("a"))
    path = tmp_path / "eps.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    with pytest.raises(ValueError, match=r"eps.onnx: node 'bn7' has a non-numeric epsilon b'tiny'"):
        check_batchnorm_nodes(path)


def test_weight_standardisation_nodes_are_not_batch_norm(tmp_path):
    """timm's StdConv2d and ScaledStdConv2d (F.batch_norm on their weights): a model without BN
    exports, and on one with a real BN nothing blames that layer: torch's default exporter
    names the standardisation's scale after the real layer's weight (both all ones)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    no_bn = nn.Sequential(tp.BatchNormStdConv2d(16, 64, 3), nn.ReLU(), tp.ScaledStdConv2d(64, 8, 3))
    for exporter in ({}, {"dynamo": False}):
        result = export_folded(no_bn, x, tmp_path / "ws.onnx", **exporter)
        assert result.batchnorm_nodes.nodes == [] and result.batchnorm_nodes.ok
        assert len(result.batchnorm_nodes.weight_standardization) >= 1
    with_bn = nn.Sequential(
        tp.BatchNormStdConv2d(16, 64, 3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        tp.ScaledStdConv2d(64, 8, 3),
    ).eval()
    program = torch.onnx.export(with_bn, (x,), dynamo=True, verbose=False)
    nodes = [n for n in program.model_proto.graph.node if n.op_type == "BatchNormalization"]
    assert [list(n.input)[1] for n in nodes] == ["1.weight", "1.weight"]  # one name, two nodes
    check = check_batchnorm_nodes(program.model_proto, with_bn)
    assert check.ok, check.problems()
    assert [n.layer for n in check.nodes] == ["1"] and len(check.weight_standardization) == 1
    assert "1 more on weights only, weight standardisation: not checked" in str(check)
    result = export_folded(with_bn, x, tmp_path / "ws_bn.onnx")
    assert [n.layer for n in result.batchnorm_nodes.nodes] == ["1"]  # after a StdConv: kept
