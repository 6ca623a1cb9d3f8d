"""bnstats.onnx.export_folded against torch.onnx.export's real graphs and onnxruntime."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from tests.doc_examples import run_section_examples
from tests.optional import optional_import

torch = pytest.importorskip("torch")
onnx = optional_import("onnx")
ort = optional_import("onnxruntime")
optional_import("onnxscript")  # torch's default (dynamo) exporter needs it

from torch import nn  # noqa: E402

from bnstats.onnx import OnnxExportError, export_folded  # noqa: E402
from tests.onnx.models import DeepChain, Net, TwoHeads, trained  # noqa: E402


def _bn_op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if "Normalization" in n.op_type]


def test_export_folded_leaves_no_bn_node_and_onnxruntime_matches_torch(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = trained(Net(), x)  # left in training mode: the export must use eval mode
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
        truth = copy.deepcopy(model).double()(x.double()).numpy()
        np.testing.assert_allclose(one, model(x[:1]).numpy(), rtol=1e-5, atol=1e-5)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    assert result.max_abs_error == pytest.approx(np.abs(got - expected).max(), rel=1e-6)
    assert result.agreement.graph_error == pytest.approx(np.abs(got - truth).max(), rel=1e-6)
    assert result.agreement.torch_error == pytest.approx(np.abs(expected - truth).max(), rel=1e-6)
    assert result.output_scale == pytest.approx(np.abs(truth).max())
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


def test_a_deep_model_is_judged_against_float64_not_a_fixed_tolerance(tmp_path):
    """40 Linear+BN layers: torch's own float32 output is ~4e-5 of the output from a float64
    run, onnxruntime's as well: the fixed 1e-5 tolerance refused this correct export."""
    model = DeepChain()
    x = torch.randn(4, 16)
    result = export_folded(model, x, tmp_path / "deep.onnx", dynamo=False)
    agreement = result.agreement
    assert agreement.reference == "float64"
    assert agreement.torch_error > 1e-5 * agreement.scale  # float32 itself is farther than 1e-5
    assert result.max_abs_error > 1e-5 * result.output_scale  # the old rule refused it
    assert agreement.graph_error <= 4 * agreement.torch_error
    assert f"torch's float32 eval {agreement.torch_error:.3g}" in str(result)


def stale_exports(monkeypatch, relative: float) -> None:
    """torch.onnx.export writes the model with its last layer's output scaled by
    ``1 + relative``: a graph exported before the model changed."""
    real = torch.onnx.export

    def export(model, args, *rest, **options):
        stale = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in list(stale.parameters())[-2:]:  # the last layer's weight and bias
                parameter.mul_(1 + relative)
        return real(stale, args, *rest, **options)

    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize("exporter", [{"dynamo": False}, {}], ids=["torchscript", "dynamo"])
def test_a_wrong_graph_is_refused_and_nothing_written(tmp_path, monkeypatch, exporter):
    if exporter:  # the deep model: 2e-3 is about 10x its float32 rounding
        model, x, relative = DeepChain(), torch.randn(4, 16), 2e-3
    else:  # a shallow one: 1e-4 is far above its rounding (1e-7) yet below the old 1e-5 floor x 10
        model, x, relative = trained(Net(), torch.randn(4, 3, 8, 8)), torch.randn(4, 3, 8, 8), 1e-4
    stale_exports(monkeypatch, relative)
    with pytest.raises(OnnxExportError, match="does not compute the model's eval output.*nothing"):
        export_folded(model, x, tmp_path / "wrong.onnx", **exporter)
    assert list(tmp_path.iterdir()) == []


def test_torchscript_options_pass_through_and_others_are_named(tmp_path):
    model = trained(Net(), torch.randn(4, 3, 8, 8)).eval()
    x = torch.randn(4, 3, 8, 8)
    names = {"input_names": ["image"], "dynamic_axes": {"image": {0: "batch"}}}
    result = export_folded(model, x, tmp_path / "ts.onnx", dynamo=False, **names)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    with torch.no_grad():
        one = session.run(None, {"image": x[:1].numpy()})[0]  # the batch is dynamic
        np.testing.assert_allclose(one, model(x[:1]).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dynamic_axes with dynamo=False needs input_names"):
        export_folded(model, x, tmp_path / "a.onnx", dynamo=False, dynamic_axes={"x": {0: "b"}})
    with pytest.raises(ValueError, match="does not pass training to .* it passes dynamo, "):
        export_folded(model, x, tmp_path / "a.onnx", training=torch.onnx.TrainingMode.TRAINING)
    with pytest.raises(ValueError, match="does not pass dynamic_shapes to the TorchScript"):
        export_folded(model, x, tmp_path / "a.onnx", dynamo=False, dynamic_shapes=({0: "b"},))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts.onnx"]


@pytest.mark.parametrize("rtol", [math.nan, math.inf, -1e-5, "1e-5"])
def test_a_tolerance_that_would_switch_the_check_off_is_refused(tmp_path, rtol):
    with pytest.raises((ValueError, TypeError), match="rtol must be"):
        export_folded(Net(), torch.randn(2, 3, 8, 8), tmp_path / "a.onnx", rtol=rtol)
    with pytest.raises(ValueError, match="factor must be finite"):
        export_folded(Net(), torch.randn(2, 3, 8, 8), tmp_path / "a.onnx", factor=math.nan)


def test_a_model_returning_none_gets_a_clear_error(tmp_path):
    class Nothing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            self.bn(x)

    with pytest.raises(OnnxExportError, match="returned NoneType, no tensor"):
        export_folded(Nothing(), torch.randn(2, 3), tmp_path / "none.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_exporter_prints_nothing_on_success_or_failure(tmp_path, capfd, monkeypatch):
    import warnings

    x = torch.randn(4, 3, 8, 8)
    model = trained(Net(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exporter warning must not escape (nor raise)
        result = export_folded(model, x, tmp_path / "a.onnx")
        legacy = export_folded(model, x, tmp_path / "b.onnx", dynamo=False)
        stale_exports(monkeypatch, 1e-2)
        with pytest.raises(OnnxExportError):
            export_folded(model, x, tmp_path / "c.onnx")
    assert capfd.readouterr() == ("", "")
    assert any("DeprecationWarning" in line for line in legacy.export_warnings)
    assert isinstance(result.export_warnings, list)


def test_the_example_in_docs_integrations_md_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_section_examples("integrations.md", "Exporting to ONNX")
    out = capsys.readouterr().out
    assert "0 BatchNormalization node(s) left" in out
    assert "differs from the model's eval output" in out
    assert "statistics look stale in 2 BN layer(s): 1, 4" in out


def test_a_wrong_small_output_is_refused_beside_a_large_one(tmp_path, monkeypatch):
    """The small head (around 1e-3) exported 1 % off: far below 1e-5 of the logits (around
    1e3), which judged every output against the largest one and accepted it."""
    x = torch.randn(2, 3, 16, 16)
    model = trained(TwoHeads(), x).eval()
    stale_exports(monkeypatch, 1e-2)  # `small` is the model's last layer
    with pytest.raises(
        OnnxExportError, match=r"nothing was written: output 0: .*\noutput 1: REFUSED: "
    ):
        export_folded(model, x, tmp_path / "heads.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_float16_model_is_named_as_such(tmp_path):
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model = trained(model, torch.randn(16, 8)).eval().half()
    result = export_folded(model, torch.randn(4, 8).half(), tmp_path / "half.onnx")
    assert result.agreement.dtype == "float16"
    assert "torch's float16 eval" in str(result) and "float32" not in str(result)
