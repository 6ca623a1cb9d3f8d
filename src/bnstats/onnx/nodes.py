"""The ``BatchNormalization`` nodes of an ONNX graph, checked against the PyTorch model.

A node normalizes activations (its input depends on the graph's inputs) or a constant: timm's
weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d``) call ``F.batch_norm`` on
their own weights, which exporters write as ``BatchNormalization`` nodes whose input is a weight
initializer or a function of initializers only. Those compute each filter's standardisation,
not test-time statistics: they are listed apart and never checked or matched to a BN layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnstats.onnx._graph import ScopedNode, is_standard, load, require, walk

if TYPE_CHECKING:
    import onnx
    from torch import nn

_DEFAULT_EPSILON = 1e-5  # the ONNX operator's default


@dataclass(frozen=True)
class BatchNormNode:
    """One ``BatchNormalization`` node: its name (``path/name`` inside a subgraph), the model's
    layer it was matched to (by the names of its statistics, ``None`` when no model was given
    or none matched), its ``epsilon``, whether it runs in training mode, and what is wrong."""

    node: str
    layer: str | None
    epsilon: float
    training_mode: bool
    problems: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``node 'bn' (layer 'features.1')`` as messages name it."""
        layer = "" if self.layer is None else f" (layer {layer_label(self.layer)!r})"
        return f"node {self.node!r}{layer}"


@dataclass
class BatchNormNodes:
    """Every ``BatchNormalization`` node of a graph on activations, in graph order, and the
    names of those on constants only (weight standardisation), which are not checked."""

    nodes: list[BatchNormNode] = field(default_factory=list)
    weight_standardization: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(node.problems for node in self.nodes)

    def problems(self) -> list[str]:
        """One line per problem: ``node 'bn' (layer 'features.1'): ...``."""
        return [f"{node.label}: {p}" for node in self.nodes for p in node.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "nodes": [asdict(node) for node in self.nodes],
            "weight_standardization": list(self.weight_standardization),
        }

    def __str__(self) -> str:
        skipped = len(self.weight_standardization)
        note = (
            f" ({skipped} more on weights only, weight standardisation: not checked)"
            if skipped
            else ""
        )
        if not self.nodes:
            return f"no BatchNormalization node in the graph{note.replace(' more', '')}"
        head = f"{len(self.nodes)} BatchNormalization node(s){note}"
        return "\n".join(
            [f"{head}: {'all in inference mode' if self.ok else 'PROBLEMS'}"]
            + [f"  {line}" for line in self.problems()]
        )


def check_batchnorm_nodes(
    graph: onnx.ModelProto | str | Path, model: nn.Module | None = None
) -> BatchNormNodes:
    """Check every ``BatchNormalization`` node of an ONNX graph (a ``ModelProto`` or a file),
    those inside ``If``/``Loop``/``Scan`` subgraphs included.

    A file that is no ONNX model (an empty file, garbage bytes: no opset, node or output) is
    refused with a ``ValueError`` naming it. Nodes whose input is a constant of the graph
    (weight standardisation: timm's ``StdConv2d`` normalizes its weights with ``F.batch_norm``)
    are listed in ``weight_standardization`` and not checked.

    Without ``model``: a node in training mode (``training_mode=1``, or more than one output
    as older opsets export training) is a problem. With the PyTorch ``model`` the graph was
    exported from, each node is matched to its BN layer by the names of its mean and variance
    inputs (``features.1.running_mean`` -> layer ``features.1``, as ``torch.onnx.export`` names
    them) and also checked for: ``epsilon`` equal to the layer's ``eps`` in float32, and the
    mean and variance stored in the graph equal to the layer's running buffers (an export
    from before a recalibration is stale). A node that matches no layer is reported.

    Returns :class:`BatchNormNodes` (``.ok``, ``.problems()``, ``str``, ``.to_dict()``).
    """
    proto, label = load(graph)
    layers = {} if model is None else _batchnorm_layers(model)
    result = BatchNormNodes()
    for scoped in walk(proto.graph):
        if not is_standard(scoped.node, "BatchNormalization"):
            continue
        if scoped.node.input and scoped.node.input[0] in scoped.dynamic:
            result.nodes.append(_check_node(scoped, layers, model is not None, label))
        else:  # a function of the graph's constants: weight standardisation
            result.weight_standardization.append(scoped.label)
    return result


def _batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    import bnstats.torch as bt

    return {name: m for name, m in bt.unwrap(model).named_modules() if bt.is_batchnorm(m)}


def _check_node(scoped: ScopedNode, layers: dict, with_model: bool, label: str) -> BatchNormNode:
    node = scoped.node
    epsilon = _number(scoped, "epsilon", _DEFAULT_EPSILON, label)
    training = bool(_number(scoped, "training_mode", 0, label)) or sum(map(bool, node.output)) > 1
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
        problems += _compare_with_layer(scoped, epsilon, layers[layer_name])
    return BatchNormNode(scoped.label, layer_name, epsilon, training, tuple(problems))


def _number(scoped: ScopedNode, name: str, default: float, label: str) -> float:
    """The node's numeric attribute ``name``; a ``ValueError`` naming file and node if not."""
    attribute = next((a for a in scoped.node.attribute if a.name == name), None)
    if attribute is None:
        return default
    value = require("onnx").helper.get_attribute_value(attribute)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{label}: node {scoped.label!r} has a non-numeric {name} {value!r}")


def _layer_name(node: onnx.NodeProto, layers: dict[str, Any]) -> str | None:
    for index, attribute in ((3, "running_mean"), (4, "running_var"), (1, "weight")):
        name = _owner(node.input[index], attribute) if len(node.input) > index else None
        if name in layers:
            return name
    return None


def _owner(value: str, attribute: str) -> str | None:
    """The module whose ``attribute`` the graph value ``value`` is, as ``torch.onnx.export``
    names it: ``features.1`` for ``features.1.running_mean``, ``""`` (the model itself, a bare
    BN layer) for ``running_mean``; None for another name."""
    if value == attribute:
        return ""
    suffix = f".{attribute}"
    return value[: -len(suffix)] if value.endswith(suffix) else None


def layer_label(name: str) -> str:
    """A layer's qualified name as messages show it (the model itself is ``<model>``)."""
    return name or "<model>"


def _compare_with_layer(scoped: ScopedNode, epsilon: float, layer: Any) -> list[str]:
    problems = []
    if np.float32(epsilon) != np.float32(layer.eps):
        problems.append(f"epsilon {epsilon:.6g} but the layer's eps is {layer.eps:.6g}")
    for index, key in ((3, "running_mean"), (4, "running_var")):
        name = scoped.node.input[index] if len(scoped.node.input) > index else ""
        stored = scoped.constant(name)
        buffer = getattr(layer, key, None)
        if stored is None or buffer is None:
            continue
        value = stored.astype(np.float64)
        expected = buffer.detach().cpu().double().numpy()
        if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-6, atol=0):
            problems.append(f"its {key} differs from the layer's (exported before a change?)")
    return problems


__all__ = ["BatchNormNode", "BatchNormNodes", "check_batchnorm_nodes", "layer_label"]
