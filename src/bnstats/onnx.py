"""ONNX: export a model with its batch norm folded away, and check an exported graph's BN nodes.

Exports lose accuracy to batch norm in two ways that no error reveals: a
``BatchNormalization`` node with ``training_mode=1`` (or, before opset 14, extra outputs)
normalizes every inference batch by its own statistics, and a node whose ``epsilon`` is not
the layer's (an exporter's default 1e-5 for a Keras-trained 1e-3 layer) shifts every output
a little. :func:`check_batchnorm_nodes` reads every ``BatchNormalization`` node of a graph and,
given the PyTorch model, compares it with the layer it came from (eps, inference mode, the
running statistics). :func:`export_folded` folds the model (:func:`bnstats.torch.fold`),
exports it with ``torch.onnx.export``, checks that no ``BatchNormalization`` node is left (or
checks those that are) and that onnxruntime computes what PyTorch computes in eval mode.

Needs the ``onnx`` extra (``pip install ".[onnx]"``: onnx, onnxscript, onnxruntime);
torch is imported only by the functions that take a PyTorch model.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnstats._files import atomic_write_bytes

if TYPE_CHECKING:
    import onnx
    from torch import nn

_DEFAULT_EPSILON = 1e-5  # the ONNX operator's default
_INSTALL = 'pip install ".[onnx]" (from a checkout of bnstats)'


class OnnxExportError(ValueError):
    """The exported graph does not compute what the model computes; nothing was written."""


@dataclass(frozen=True)
class BatchNormNode:
    """One ``BatchNormalization`` node: its name, the model's layer it was matched to (by the
    names of its statistics, ``None`` when no model was given or none matched), its
    ``epsilon``, whether it runs in training mode, and what is wrong with it."""

    node: str
    layer: str | None
    epsilon: float
    training_mode: bool
    problems: tuple[str, ...] = ()


@dataclass
class BatchNormNodes:
    """Every ``BatchNormalization`` node of a graph, in graph order."""

    nodes: list[BatchNormNode] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(node.problems for node in self.nodes)

    def problems(self) -> list[str]:
        """One line per problem: ``node 'bn' (layer 'features.1'): ...``."""
        return [
            f"node {node.node!r}{'' if node.layer is None else f' (layer {node.layer!r})'}: {p}"
            for node in self.nodes
            for p in node.problems
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "nodes": [asdict(node) for node in self.nodes]}

    def __str__(self) -> str:
        if not self.nodes:
            return "no BatchNormalization node in the graph"
        head = f"{len(self.nodes)} BatchNormalization node(s)"
        return "\n".join(
            [f"{head}: {'all in inference mode' if self.ok else 'PROBLEMS'}"]
            + [f"  {line}" for line in self.problems()]
        )


def check_batchnorm_nodes(graph: onnx.ModelProto | str | Path, model: nn.Module | None = None):
    """Check every ``BatchNormalization`` node of an ONNX graph (a ``ModelProto`` or a file).

    Without ``model``: a node in training mode (``training_mode=1``, or more than one output
    as older opsets export training) is a problem. With the PyTorch ``model`` the graph was
    exported from, each node is matched to its BN layer by the names of its mean and variance
    inputs (``features.1.running_mean`` -> layer ``features.1``, as ``torch.onnx.export`` names
    them) and also checked for: ``epsilon`` equal to the layer's ``eps`` in float32, and the
    mean and variance stored in the graph equal to the layer's running buffers (an export
    from before a recalibration is stale). A node that matches no layer is reported.

    Returns :class:`BatchNormNodes` (``.ok``, ``.problems()``, ``str``, ``.to_dict()``).
    """
    proto = _load(graph)
    layers = {} if model is None else _batchnorm_layers(model)
    initializers = {init.name: init for init in proto.graph.initializer}
    nodes = [
        _check_node(node, layers, initializers, model is not None)
        for node in proto.graph.node
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
    ]
    return BatchNormNodes(nodes)


def _load(graph: Any) -> onnx.ModelProto:
    onnx = _require("onnx")
    if isinstance(graph, onnx.ModelProto):
        return graph
    path = Path(graph)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError and others for a broken file
        raise ValueError(f"{path} is not an ONNX model: {error}") from error


def _require(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{name} is needed for ONNX export and checks: {_INSTALL}") from error


def _batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    import bnstats.torch as bt

    return {name: m for name, m in bt.unwrap(model).named_modules() if bt.is_batchnorm(m)}


def _check_node(
    node: onnx.NodeProto, layers: dict[str, Any], initializers: dict, with_model: bool
) -> BatchNormNode:
    onnx = _require("onnx")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    epsilon = float(attributes.get("epsilon", _DEFAULT_EPSILON))
    training = bool(attributes.get("training_mode", 0)) or sum(1 for o in node.output if o) > 1
    problems = []
    if training:
        problems.append(
            "training mode: every inference batch is normalized by its own statistics "
            "(export the model in eval mode)"
        )
    layer_name = _layer_name(node, layers)
    if with_model and layer_name is None:
        problems.append("matches no BN layer of the model (by the names of its mean and var)")
    if layer_name is not None:
        problems += _compare_with_layer(node, epsilon, layers[layer_name], initializers)
    return BatchNormNode(node.name, layer_name, epsilon, training, tuple(problems))


def _layer_name(node: onnx.NodeProto, layers: dict[str, Any]) -> str | None:
    for index, suffix in ((3, ".running_mean"), (4, ".running_var"), (1, ".weight")):
        if len(node.input) > index and node.input[index].endswith(suffix):
            name = node.input[index][: -len(suffix)]
            if name in layers:
                return name
    return None


def _compare_with_layer(
    node: onnx.NodeProto, epsilon: float, layer: Any, initializers: dict
) -> list[str]:
    problems = []
    if np.float32(epsilon) != np.float32(layer.eps):
        problems.append(f"epsilon {epsilon:.6g} but the layer's eps is {layer.eps:.6g}")
    onnx = _require("onnx")
    for index, key in ((3, "running_mean"), (4, "running_var")):
        stored = initializers.get(node.input[index]) if len(node.input) > index else None
        buffer = getattr(layer, key, None)
        if stored is None or buffer is None:
            continue
        value = onnx.numpy_helper.to_array(stored).astype(np.float64)
        expected = buffer.detach().cpu().double().numpy()
        if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-6, atol=0):
            problems.append(f"its {key} differs from the layer's (exported before a change?)")
    return problems


@dataclass
class OnnxExport:
    """What :func:`export_folded` wrote and checked.

    ``path``: the ONNX file; ``fold_report``: what fold did with each BN layer;
    ``batchnorm_nodes``: the ``BatchNormalization`` nodes left in the graph (none when every
    layer folded); ``max_abs_error``: the largest ``|onnxruntime - torch|`` over the outputs
    on ``example_inputs``; ``output_scale``: the largest ``|torch|``; ``rtol``: the tolerance
    ``max_abs_error <= rtol * output_scale`` that was met.
    """

    path: Path
    fold_report: Any
    batchnorm_nodes: BatchNormNodes
    max_abs_error: float
    output_scale: float
    rtol: float

    def __str__(self) -> str:
        left = len(self.batchnorm_nodes.nodes)
        lines = [
            f"wrote {self.path}: {len(self.fold_report.folded)} of {len(self.fold_report)} BN "
            f"layer(s) folded, {left} BatchNormalization node(s) left",
            f"onnxruntime vs torch eval: max |difference| {self.max_abs_error:.3g} "
            f"(outputs up to {self.output_scale:.3g}; tolerance {self.rtol:g} relative)",
        ]
        if left:
            lines.append(str(self.batchnorm_nodes))
        return "\n".join(lines)


def export_folded(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    rtol: float = 1e-5,
    **export_kwargs: Any,
) -> OnnxExport:
    """Fold ``model``'s BN layers, export the result to ONNX at ``path`` and check it.

    1. ``bt.fold(model, example_inputs)`` (the model itself is left untouched);
    2. ``torch.onnx.export(folded, args, ..., **export_kwargs)`` (``dynamo``, ``opset_version``,
       ``dynamic_shapes`` ... pass through; torch's default exporter otherwise). Unless
       ``dynamic_shapes`` or ``dynamic_axes`` say otherwise, the first dimension of every
       tensor input is exported as a dynamic ``batch`` dimension (torch's default exporter;
       the TorchScript one, ``dynamo=False``, keeps the example's shapes);
    3. :func:`check_batchnorm_nodes` on the graph against the folded model: BN layers that did
       not fold (see ``fold_report``) appear as nodes and must be in inference mode with the
       layer's eps;
    4. onnxruntime (CPU) runs the graph on ``example_inputs`` and every output must match the
       ORIGINAL model's eval-mode output: ``max |ort - torch| <= rtol * max |torch|``.

    The model is folded and exported in eval mode (its own training flags are put back).
    ``example_inputs``: a tensor or a tuple of positional tensors. The file is written only if
    every check passes, atomically; otherwise :class:`OnnxExportError` (a ``ValueError``) says
    which check failed and nothing is written. Models over 2 GB (ONNX external data) are not
    supported. Returns :class:`OnnxExport`.
    """
    import torch

    import bnstats.torch as bt

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    ort = _require("onnxruntime")
    _require("onnx")
    modes = [(module, module.training) for module in model.modules()]
    try:
        with torch.no_grad():
            model.eval()  # fold copies the model in eval mode; the flags come back below
            folded = bt.fold(model, args)
            expected = _flat_arrays(model(*args))
    finally:
        for module, training in modes:
            module.training = training
    data = _exported_bytes(torch, folded, args, export_kwargs)
    nodes = check_batchnorm_nodes(_require("onnx").load_from_string(data), folded)
    if not nodes.ok:
        raise OnnxExportError("the exported graph's BN nodes:\n" + "\n".join(nodes.problems()))
    got = _run_onnxruntime(ort, data, args)
    error, scale = _compare(got, expected, rtol)
    written = atomic_write_bytes(path, data)
    return OnnxExport(written, folded.fold_report, nodes, error, scale, rtol)


def _exported_bytes(torch: Any, model: Any, args: tuple, export_kwargs: dict) -> bytes:
    """The serialized graph, in memory: the file is written only once it has been checked."""
    with torch.no_grad():
        if export_kwargs.get("dynamo", True) is False:  # the TorchScript exporter
            buffer = io.BytesIO()
            torch.onnx.export(model, args, buffer, **export_kwargs)
            return buffer.getvalue()
        defaults: dict[str, Any] = {"verbose": False}  # no progress lines on stdout
        if "dynamic_shapes" not in export_kwargs and "dynamic_axes" not in export_kwargs:
            defaults["dynamic_shapes"] = tuple(_batch_axis(arg) for arg in args)
        program = torch.onnx.export(model, args, **{**defaults, **export_kwargs})
    return program.model_proto.SerializeToString()


def _batch_axis(arg: Any) -> dict[int, str] | None:
    """Dimension 0 of a tensor input is the batch, of any size in the exported graph."""
    return {0: "batch"} if getattr(arg, "dim", lambda: 0)() > 0 else None


def _flat_arrays(output: Any) -> list[np.ndarray]:
    """Every tensor in ``output`` (nested tuples, lists, dicts), as float64 NumPy arrays."""
    if hasattr(output, "detach"):
        return [output.detach().cpu().double().numpy()]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [array for item in output for array in _flat_arrays(item)]
    return []


def _run_onnxruntime(ort: Any, data: bytes, args: tuple) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    tensors = [arg.detach().cpu().numpy() for arg in args if hasattr(arg, "detach")]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise OnnxExportError(
            f"the graph takes {len(names)} input(s); example_inputs hold {len(tensors)} tensor(s)"
        )
    outputs = session.run(None, dict(zip(names, tensors, strict=True)))
    return [np.asarray(o, dtype=np.float64) for o in outputs]


def _compare(got: list[np.ndarray], expected: list[np.ndarray], rtol: float) -> tuple[float, float]:
    if len(got) != len(expected) or any(
        g.shape != e.shape for g, e in zip(got, expected, strict=False)
    ):
        shapes = [g.shape for g in got], [e.shape for e in expected]
        raise OnnxExportError(f"onnxruntime's outputs {shapes[0]} are not torch's {shapes[1]}")
    error = max((float(np.abs(g - e).max(initial=0.0)) for g, e in zip(got, expected, strict=True)))
    scale = max((float(np.abs(e).max(initial=0.0)) for e in expected), default=0.0)
    if not np.isfinite(error) or error > rtol * scale:
        raise OnnxExportError(
            f"onnxruntime's output differs from torch's eval output by up to {error:.3g} "
            f"(outputs up to {scale:.3g}; tolerance {rtol:g} relative); nothing was written"
        )
    return error, scale


__all__ = [
    "BatchNormNode",
    "BatchNormNodes",
    "OnnxExport",
    "OnnxExportError",
    "check_batchnorm_nodes",
    "export_folded",
]
