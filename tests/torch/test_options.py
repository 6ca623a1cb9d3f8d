"""The public surface of the pass's options: one module, explicit signatures, checked once."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bnstats.torch as bt
from bnstats.torch.options import PassOptions
from tests.torch import zoo

SRC = Path(__file__).resolve().parents[2] / "src" / "bnstats"
TOOLS = (bt.recalibrate, bt.recalibrate_report, bt.audit, bt.adapt)
OWN_DEFAULTS = {(bt.audit, "nonfinite"): "skip"}  # an audit flags NaN batches by default


def private_torch_imports(path: Path) -> list[str]:
    """The private modules of ``bnstats.torch`` (``bnstats.torch._x``, at any depth) that
    ``path`` imports, anywhere in its text."""

    def private(name: str) -> bool:
        parts = name.split(".")
        return parts[:2] == ["bnstats", "torch"] and any(p.startswith("_") for p in parts[2:])

    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if private(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if private(node.module):
                names.append(node.module)
            else:
                names += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if private(f"{node.module}.{a.name}")
                ]
    return names


def test_no_module_outside_bnstats_torch_imports_its_private_modules():
    outside = [p for p in SRC.rglob("*.py") if (SRC / "torch") not in p.parents]
    assert len(outside) > 10
    found = {str(p.relative_to(SRC)): private_torch_imports(p) for p in outside}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_finder_sees_a_private_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bnstats.torch._layers import unwrap\n")
    assert private_torch_imports(module) == ["bnstats.torch._layers"]
    module.write_text("from bnstats.torch import _pass\nimport bnstats.torch.options\n")
    assert private_torch_imports(module) == ["bnstats.torch._pass"]


@pytest.mark.parametrize("tool", TOOLS, ids=lambda tool: tool.__name__)
def test_every_tool_lists_the_options_keyword_only_with_their_defaults(tool):
    parameters = inspect.signature(tool).parameters
    for option in dataclasses.fields(PassOptions):
        parameter = parameters[option.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, option.name
        assert parameter.default == OWN_DEFAULTS.get((tool, option.name), option.default)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_options_are_checked_once_by_pass_options():
    model, data = zoo.build("mlp"), zoo.batches("mlp")
    for tool in TOOLS:
        with pytest.raises(ValueError, match="mode must be one of"):
            tool(model, data, mode="inference")
        with pytest.raises(TypeError, match="unexpected keyword argument 'tolerence'"):
            tool(model, data, tolerence=0.1)
    assert PassOptions.pick({**vars(PassOptions()), "mode": "eval", "other": 1}).mode == "eval"


def test_the_tools_pass_their_options_through():
    model, data = zoo.build("mlp"), zoo.batches("mlp")
    seen = []

    def forward(m, batch):
        seen.append(len(batch))
        return m(batch)

    result = bt.recalibrate_report(model, data, forward=forward, max_samples=5, mode="eval")
    assert result.mode == "eval" and result.samples == 5 and sum(seen) >= 5 * result.passes
    report = bt.audit(model, data, max_samples=3, progress=False)
    assert report.samples == 3
    assert isinstance(bt.find_batchnorm_layers(bt.unwrap(torch.nn.DataParallel(model))), dict)


@pytest.mark.parametrize("progress", ["yes", "False", 2, 0, 0.5, [], np.True_])
def test_progress_is_true_false_or_none_only(progress):
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        PassOptions(progress=progress)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        bt.recalibrate(zoo.build("mlp"), zoo.batches("mlp"), progress=progress)
    assert [PassOptions(progress=p).progress for p in (True, False, None)] == [True, False, None]


def test_relative_errors_of_one_batch_are_inf_as_documented():
    report = bt.recalibrate_report(zoo.build("mlp"), zoo.batches("mlp")[:1])
    assert report.relative_errors and all(e == math.inf for e in report.relative_errors.values())
    assert "worst relative standard error inf" in str(report)
