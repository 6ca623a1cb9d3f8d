"""Does a graph compute what the model computes? onnxruntime against a float64 run.

float32 arithmetic in any order is only so exact: on a deep network two correct float32
programs (torch's kernels, onnxruntime's) each differ from the exact result by far more than
1e-5 of the output (inception_v3: torch 5.3e-5, onnxruntime 3.0e-5). A fixed tolerance either
refuses correct exports of deep models or misses wrong ones of shallow models. The graph is
judged instead against a float64 run of the model (a float64 copy on the CPU), next to torch's
own eval output (in the model's dtype), each output tensor on its own::

    graph_error = max |onnxruntime - float64|      torch_error = max |torch - float64|
    scale       = max |float64|
    accepted when graph_error <= max(factor * torch_error, rtol * scale)

that is, when onnxruntime is about as close to the exact result as torch's output is (at most
``factor`` times as far, by default 4), or within ``rtol`` of that output's largest value.
Each output is judged with its own numbers, so that a small output (a box-regression head
around 1e-3) cannot hide its errors behind the rounding of a large one (logits around 1e3).
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
class OutputAgreement:
    """How close one output tensor of the graph (onnxruntime, on the example) is to the model's.

    ``index``: the output's place among the model's tensors (nested tuples, lists and dicts
    flattened in order); ``dtype``: the dtype of the model's own output (``"float32"``,
    ``"float16"``, ...). ``graph_error``: ``max |onnxruntime - reference|``; ``torch_error``:
    ``max |torch eval - reference|``; ``scale``: ``max |reference|``; ``reference``:
    ``"float64"`` (a float64 copy of the model on the CPU) or, when that run failed (``note``
    says why), the model's own output dtype: then ``torch_error`` is 0 and only ``rtol``
    applies. ``torch_difference``: ``max |onnxruntime - torch eval|``. Accepted (``ok``) when
    ``graph_error <= allowed = max(factor * torch_error, rtol * scale)``.
    """

    index: int
    dtype: str
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

    @property
    def severity(self) -> float:
        """``graph_error / allowed``: above 1 is refused; NaN and an error where nothing is
        allowed are infinite."""
        if not math.isfinite(self.graph_error):
            return math.inf
        if self.allowed == 0:
            return math.inf if self.graph_error > 0 else 0.0
        return self.graph_error / self.allowed

    def __str__(self) -> str:
        if self.reference != "float64":
            return (
                f"onnxruntime vs torch's {self.dtype} eval: max |difference| "
                f"{self.graph_error:.3g} (output up to {self.scale:.3g}; allowed {self.rtol:g} "
                f"relative; no float64 run: {self.note})"
            )
        return (
            f"onnxruntime is {self.graph_error:.3g} from a float64 run of the model, torch's "
            f"{self.dtype} eval {self.torch_error:.3g} (output up to {self.scale:.3g}; allowed "
            f"{self.allowed:.3g} = max({self.factor:g} x torch's, {self.rtol:g} x the largest))"
        )


@dataclass(frozen=True)
class Agreement:
    """How close the graph's outputs (onnxruntime, on the example) are to the model's: one
    :class:`OutputAgreement` per output tensor in ``outputs``, each judged on its own. ``ok``
    when every output is accepted.

    ``graph_error``, ``torch_error``, ``scale``, ``allowed``, ``torch_difference``, ``dtype``,
    ``reference`` and ``note`` are those of the ``worst`` output (the largest ``graph_error /
    allowed``; with one output, that output); ``index`` says which.
    """

    outputs: tuple[OutputAgreement, ...]
    rtol: float
    factor: float

    @property
    def worst(self) -> OutputAgreement:
        return max(self.outputs, key=lambda output: output.severity)

    @property
    def ok(self) -> bool:
        return all(output.ok for output in self.outputs)

    @property
    def index(self) -> int:
        return self.worst.index

    @property
    def graph_error(self) -> float:
        return self.worst.graph_error

    @property
    def torch_error(self) -> float:
        return self.worst.torch_error

    @property
    def scale(self) -> float:
        return self.worst.scale

    @property
    def allowed(self) -> float:
        return self.worst.allowed

    @property
    def torch_difference(self) -> float:
        return self.worst.torch_difference

    @property
    def dtype(self) -> str:
        return self.worst.dtype

    @property
    def reference(self) -> str:
        return self.worst.reference

    @property
    def note(self) -> str:
        return self.worst.note

    def summary(self) -> str:
        """The worst output's distance and allowance, for a one-line message:
        ``output 1 of 2: 0.0044 from a float64 run, allowed 8.9e-06``."""
        worst = self.worst
        which = f"output {worst.index} of {len(self.outputs)}: " if len(self.outputs) > 1 else ""
        return (
            f"{which}{worst.graph_error:.3g} from a {worst.reference} run, "
            f"allowed {worst.allowed:.3g}"
        )

    def __str__(self) -> str:
        if len(self.outputs) == 1:
            return str(self.outputs[0])
        return "\n".join(
            f"output {output.index}: {'' if output.ok else 'REFUSED: '}{output}"
            for output in self.outputs
        )


def check_tolerances(rtol: float, factor: float) -> None:
    """Both finite and not negative (NaN would switch the comparison off, inf accept all)."""
    for name, value in (("rtol", rtol), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and not negative, got {value!r}")


def model_outputs(model: Any, args: tuple) -> tuple[list[np.ndarray], list[str]]:
    """The model's outputs on ``args`` as float64 arrays, and each output's own dtype
    (``"float32"``, ``"float16"``, ...); an error when it returns no tensor."""
    output = model(*args)
    tensors = flat_tensors(output)
    if not tensors:
        raise OnnxExportError(
            f"the model returned {type(output).__name__}, no tensor, on example_inputs: "
            "there is nothing to export or compare"
        )
    return as_float64(tensors), [str(t.dtype).removeprefix("torch.") for t in tensors]


def float64_outputs(model: Any, args: tuple) -> tuple[list[np.ndarray] | None, str]:
    """The outputs of a float64 copy of ``model`` on the CPU (the model is not touched), or
    ``None`` and why that run failed."""
    import torch

    try:
        twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
        inputs = [_float64(arg, torch) for arg in args]
        with torch.no_grad():
            return as_float64(flat_tensors(twin(*inputs))), ""
    except Exception as error:  # any model code: report it, judge against its own dtype
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def positional(example_inputs: Any) -> tuple:
    """``example_inputs`` as positional arguments: a tuple as it is, anything else alone."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@dataclass(frozen=True)
class Reference:
    """What a graph is judged against: the model's own eval ``outputs`` on the example, their
    ``dtypes`` (:func:`model_outputs`), and a float64 run of it (``truth``,
    :func:`float64_outputs`)."""

    outputs: list[np.ndarray]
    dtypes: list[str]
    truth: tuple[list[np.ndarray] | None, str]

    def agreement(self, got: list[np.ndarray], rtol: float, factor: float) -> Agreement:
        """:func:`measure` of the graph's outputs ``got`` against this reference."""
        return measure(got, self, rtol, factor)


def reference_outputs(model: Any, args: tuple) -> Reference:
    """The :class:`Reference` of ``model`` (in eval mode) on ``args``; the model is not
    touched."""
    outputs, dtypes = model_outputs(model, args)
    return Reference(outputs, dtypes, float64_outputs(model, args))


def _float64(arg: Any, torch: Any) -> Any:
    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return arg.detach().to(device="cpu", dtype=torch.float64)
    return arg.cpu() if isinstance(arg, torch.Tensor) else arg


def flat_tensors(output: Any) -> list[Any]:
    """Every tensor in ``output`` (nested tuples, lists, dicts), in order."""
    if hasattr(output, "detach"):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [tensor for item in output for tensor in flat_tensors(item)]
    return []


def as_float64(tensors: list[Any]) -> list[np.ndarray]:
    """Each tensor as a float64 NumPy array on the host."""
    return [tensor.detach().cpu().double().numpy() for tensor in tensors]


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


def measure(got: list[np.ndarray], reference: Reference, rtol: float, factor: float) -> Agreement:
    """Compare onnxruntime's outputs ``got`` with the model's, each output on its own, as the
    module docstring says."""
    _same_shapes(got, reference.outputs)
    return Agreement(
        tuple(
            _output_agreement(index, got[index], reference, rtol, factor)
            for index in range(len(got))
        ),
        rtol,
        factor,
    )


def _output_agreement(
    index: int, got: np.ndarray, reference: Reference, rtol: float, factor: float
) -> OutputAgreement:
    own, dtype = reference.outputs[index], reference.dtypes[index]
    truth, note = reference.truth
    difference = _max_abs_difference(got, own)
    if truth is None:
        return OutputAgreement(
            index, dtype, difference, 0.0, _max_abs(own), rtol, factor, difference, dtype, note
        )
    exact = truth[index]
    return OutputAgreement(
        index,
        dtype,
        _max_abs_difference(got, exact),
        _max_abs_difference(own, exact),
        _max_abs(exact),
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


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest ``|x - y|``; NaN anywhere makes it NaN (never ignored)."""
    return float(np.abs(a - b).max(initial=0.0))


def _max_abs(array: np.ndarray) -> float:
    return float(np.abs(array).max(initial=0.0))


__all__ = [
    "DEFAULT_FACTOR",
    "DEFAULT_RTOL",
    "Agreement",
    "OnnxExportError",
    "OutputAgreement",
    "Reference",
    "as_float64",
    "check_tolerances",
    "flat_tensors",
    "float64_outputs",
    "measure",
    "model_outputs",
    "positional",
    "reference_outputs",
    "run_onnxruntime",
]
