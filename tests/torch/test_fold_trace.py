"""Tracing for fold (bnstats.torch.fold._trace): names, modes, annotations, shapes."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from bnstats.torch.fold._trace import FoldTraceError, record_shapes, trace
from tests.torch.models import TinyResNet


def test_trace_keeps_qualified_names_and_training_flags():
    model = TinyResNet()
    model.stages[1].train(False)
    gm = trace(model, "TinyResNet", is_leaf=lambda m: isinstance(m, (nn.BatchNorm2d, nn.Conv2d)))
    targets = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    assert "stages.1.0.bn2" in targets and "stem.1" in targets
    assert gm.get_submodule("stages.1").training is False and gm.get_submodule("stem").training


def test_string_annotations_are_dropped_so_the_module_pickles():
    # models.py has PEP 563 (string) annotations
    gm = trace(TinyResNet(), "TinyResNet", is_leaf=lambda m: isinstance(m, nn.BatchNorm2d))
    assert all(not isinstance(node.type, str) for node in gm.graph.nodes)
    torch.save(gm, io.BytesIO())


def test_record_shapes_and_its_errors():
    gm = trace(TinyResNet(), "TinyResNet", is_leaf=lambda m: isinstance(m, nn.BatchNorm2d))
    record_shapes(gm, torch.randn(2, 3, 8, 8), "TinyResNet")
    shapes = {
        n.target: n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "call_module"
    }
    assert tuple(shapes["stem.1"]) == (2, 8, 8, 8)
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        record_shapes(gm, {"x": 1}, "TinyResNet")
    with pytest.raises(ValueError, match=r"TinyResNet.*\(2, 5\)"):
        record_shapes(gm, torch.randn(2, 5), "TinyResNet")


def test_untraceable_forward_names_the_class():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(FoldTraceError, match="Branchy"):
        trace(Branchy(), "Branchy", is_leaf=lambda m: False)
