"""bnstats.onnx._agreement: the graph's outputs against the model's, each output on its own."""

from __future__ import annotations

import numpy as np
import pytest

from bnstats.onnx import Agreement
from bnstats.onnx._agreement import Reference, measure


def _reference(outputs: list[np.ndarray], dtypes: list[str], exact: bool = True) -> Reference:
    """The model's own outputs, 1e-7 relative from a float64 run (float32 rounding)."""
    own = [o * (1 + 1e-7) for o in outputs]
    return Reference(own, dtypes, (outputs, "") if exact else (None, "RuntimeError: no"))


def test_a_small_output_cannot_hide_behind_a_large_one():
    big, small = np.full((2, 10), 1e3), np.full((2, 2), 1e-3)
    reference = _reference([big, small], ["float32", "float32"])
    wrong_small = small * 2.17  # 117 % off, far below 1e-5 of the large output
    agreement = measure([big, wrong_small], reference, 1e-5, 4.0)
    assert isinstance(agreement, Agreement)
    assert not agreement.ok
    assert [o.ok for o in agreement.outputs] == [True, False]
    assert agreement.index == 1 and agreement.worst is agreement.outputs[1]
    assert agreement.scale == pytest.approx(1e-3)  # the small output's own scale
    assert agreement.summary().startswith("output 1 of 2: 0.00117 from a float64 run")
    assert "output 1: REFUSED: onnxruntime is 0.00117" in str(agreement)
    right = measure([big * (1 + 2e-7), small * (1 + 2e-7)], reference, 1e-5, 4.0)
    assert right.ok and len(str(right).splitlines()) == 2


def test_one_output_reads_as_before():
    output = np.linspace(-1, 1, 12).reshape(3, 4)
    agreement = measure([output], _reference([output], ["float32"]), 1e-5, 4.0)
    assert agreement.ok and agreement.index == 0
    assert agreement.summary() == f"0 from a float64 run, allowed {agreement.allowed:.3g}"
    assert str(agreement) == str(agreement.outputs[0])
    assert "torch's float32 eval" in str(agreement)


def test_the_text_names_the_models_own_dtype():
    output = np.linspace(-1, 1, 12).reshape(3, 4)
    half = measure([output], _reference([output], ["float16"]), 1e-5, 4.0)
    assert "torch's float16 eval" in str(half) and "float32" not in str(half)
    alone = measure([output], _reference([output], ["bfloat16"], exact=False), 1e-5, 4.0)
    assert alone.reference == "bfloat16"
    assert str(alone).startswith("onnxruntime vs torch's bfloat16 eval")
    assert alone.summary().endswith(f"from a bfloat16 run, allowed {alone.allowed:.3g}")


def test_nan_in_any_output_is_the_worst_and_refused():
    outputs = [np.ones(3), np.ones(3)]
    reference = _reference(outputs, ["float32", "float32"])
    agreement = measure([np.ones(3), np.array([1.0, np.nan, 1.0])], reference, 1e-5, 4.0)
    assert not agreement.ok and agreement.index == 1
