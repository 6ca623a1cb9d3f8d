"""Does a graph compute what the model computes? onnxruntime against a float64 run.

float32 arithmetic in any order is only so exact: on a deep network two correct float32
programs (torch's kernels, onnxruntime's) each differ from the exact result by far more than
1e-5 of the output (inception_v3: torch 5.3e-5, onnxruntime 3.0e-5). A fixed tolerance either
refuses correct exports of deep models or misses wrong ones of shallow models. The graph is
judged instead against a float64 run of the model (a float64 copy on the CPU), next to torch's
own float32 eval output::

    graph_error = max |onnxruntime - float64|      torch_error = max |torch - float64|
    scale       = max |float64|
    accepted when graph_error <= max(factor * torch_error, rtol * scale)

that is, when onnxruntime is about as close to the exact result as torch's float32 output is
(at most ``factor`` times as far, by default 4), or within ``rtol`` of the largest output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_RTOL = 1e-5
DEFAULT_FACTOR = 4.0


class OnnxExportError(ValueError):
    """The exported graph does not compute what the model computes; nothing was written."""


@dataclass(frozen=True)
class Agreement:
    """How close the graph's outputs (onnxruntime, on the example) are to the model's.

    ``graph_error``: ``max |onnxruntime - reference|``; ``torch_error``: ``max |torch float32
    eval - reference|``; ``scale``: ``max |reference|``; ``reference``: ``"float64"`` (a
    float64 copy of the model on the CPU) or ``"float32"`` when that run failed (``note``
    says why; then ``torch_error`` is 0 and only ``rtol`` applies). ``torch_difference``:
    ``max |onnxruntime - torch float32|``. Accepted (``ok``) when ``graph_error <=
    allowed = max(factor * torch_error, rtol * scale)``.
    """

    graph_error: float
    torch_error: float
    scale: float
    rtol: float
    factor: float
    torch_difference: float
    reference: str = "float64"
    note: str = ""

    @property
    def allowed(self) -> float:
        return max(self.factor * self.torch_error, self.rtol * self.scale)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.graph_error) and self.graph_error <= self.allowed

    def __str__(self) -> str:
        if self.reference != "float64":
            return (
                f"onnxruntime vs torch's float32 eval: max |difference| {self.graph_error:.3g} "
                f"(outputs up to {self.scale:.3g}; allowed {self.rtol:g} relative; no float64 "
                f"run: {self.note})"
            )
        return (
            f"onnxruntime is {self.graph_error:.3g} from a float64 run of the model, torch's "
            f"float32 eval {self.torch_error:.3g} (outputs up to {self.scale:.3g}; allowed "
            f"{self.allowed:.3g} = max({self.factor:g} x torch's, {self.rtol:g} x the largest))"
        )


def check_tolerances(rtol: float, factor: float) -> None:
    """Both finite and not negative (NaN would switch the comparison off, inf accept all)."""
    for name, value in (("rtol", rtol), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and not negative, got {value!r}")


def model_outputs(model: Any, args: tuple) -> list[np.ndarray]:
    """The model's outputs on ``args`` as float64 arrays; an error when it returns no tensor."""
    output = model(*args)
    arrays = flat_arrays(output)
    if not arrays:
        raise OnnxExportError(
            f"the model returned {type(output).__name__}, no tensor, on example_inputs: "
            "there is nothing to export or compare"
        )
    return arrays


def float64_outputs(model: Any, args: tuple) -> tuple[list[np.ndarray] | None, str]:
    """The outputs of a float64 copy of ``model`` on the CPU (the model is not touched), or
    ``None`` and why that run failed."""
    import torch

    try:
        twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
        inputs = [_float64(arg, torch) for arg in args]
        with torch.no_grad():
            return flat_arrays(twin(*inputs)), ""
    except Exception as error:  # any model code: report it, judge against float32 instead
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def positional(example_inputs: Any) -> tuple:
    """``example_inputs`` as positional arguments: a tuple as it is, anything else alone."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@dataclass(frozen=True)
class Reference:
    """What a graph is judged against: the model's own eval ``outputs`` on the example
    (:func:`model_outputs`) and a float64 run of it (``truth``, :func:`float64_outputs`)."""

    outputs: list[np.ndarray]
    truth: tuple[list[np.ndarray] | None, str]

    def agreement(self, got: list[np.ndarray], rtol: float, factor: float) -> Agreement:
        """:func:`measure` of the graph's outputs ``got`` against this reference."""
        return measure(got, self.outputs, self.truth, rtol, factor)


def reference_outputs(model: Any, args: tuple) -> Reference:
    """The :class:`Reference` of ``model`` (in eval mode) on ``args``; the model is not
    touched."""
    return Reference(model_outputs(model, args), float64_outputs(model, args))


def _float64(arg: Any, torch: Any) -> Any:
    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return arg.detach().to(device="cpu", dtype=torch.float64)
    return arg.cpu() if isinstance(arg, torch.Tensor) else arg


def flat_arrays(output: Any) -> list[np.ndarray]:
    """Every tensor in ``output`` (nested tuples, lists, dicts), as float64 NumPy arrays."""
    if hasattr(output, "detach"):
        return [output.detach().cpu().double().numpy()]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [array for item in output for array in flat_arrays(item)]
    return []


def run_onnxruntime(model: bytes | str, args: tuple) -> list[np.ndarray]:
    """The graph's outputs on the tensors of ``args`` (onnxruntime, CPU), as float64 arrays."""
    from bnstats.onnx._graph import require

    ort = require("onnxruntime")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    tensors = [arg.detach().cpu().numpy() for arg in args if hasattr(arg, "detach")]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise OnnxExportError(
            f"the graph takes {len(names)} input(s); example_inputs hold {len(tensors)} tensor(s)"
        )
    outputs = session.run(None, dict(zip(names, tensors, strict=True)))
    return [np.asarray(o, dtype=np.float64) for o in outputs]


def measure(
    got: list[np.ndarray],
    torch32: list[np.ndarray],
    truth: tuple[list[np.ndarray] | None, str],
    rtol: float,
    factor: float,
) -> Agreement:
    """Compare onnxruntime's outputs ``got`` with the model's, as the module docstring says."""
    _same_shapes(got, torch32)
    reference, note = truth
    difference = _max_abs_difference(got, torch32)
    if reference is None:
        return Agreement(
            difference, 0.0, _max_abs(torch32), rtol, factor, difference, "float32", note
        )
    return Agreement(
        _max_abs_difference(got, reference),
        _max_abs_difference(torch32, reference),
        _max_abs(reference),
        rtol,
        factor,
        difference,
    )


def _same_shapes(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    if len(got) != len(expected) or any(
        g.shape != e.shape for g, e in zip(got, expected, strict=False)
    ):
        shapes = [g.shape for g in got], [e.shape for e in expected]
        raise OnnxExportError(f"onnxruntime's outputs {shapes[0]} are not torch's {shapes[1]}")


def _max_abs_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest ``|x - y|`` over all outputs; NaN anywhere makes it NaN (never ignored)."""
    return float(np.max([np.abs(x - y).max(initial=0.0) for x, y in zip(a, b, strict=True)]))


def _max_abs(arrays: list[np.ndarray]) -> float:
    return float(np.max([np.abs(a).max(initial=0.0) for a in arrays], initial=0.0))


__all__ = [
    "DEFAULT_FACTOR",
    "DEFAULT_RTOL",
    "Agreement",
    "OnnxExportError",
    "check_tolerances",
    "float64_outputs",
    "flat_arrays",
    "measure",
    "model_outputs",
    "run_onnxruntime",
]
