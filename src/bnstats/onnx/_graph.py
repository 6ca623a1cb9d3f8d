"""Reading an ONNX graph: loading and validating a file, every node (subgraphs of ``If``,
``Loop`` and ``Scan`` included), the constant tensors it holds, and which values depend on
the graph's inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

_INSTALL = 'pip install ".[onnx]" (from a checkout of bnstats)'
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}


def require(name: str) -> Any:
    """``import name``, or an ImportError that says how to install the ``onnx`` extra."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{name} is needed for ONNX export and checks: {_INSTALL}") from error


def load(graph: Any) -> tuple[onnx.ModelProto, str]:
    """The model and a label naming it in messages (the file's path, or ``<ModelProto>``).

    A file that is not a model, or a model with no opset, no node or no output (an empty
    file and most garbage bytes parse as such an empty protobuf), is refused naming it."""
    onnx = require("onnx")
    if isinstance(graph, onnx.ModelProto):
        proto, label = graph, "<ModelProto>"
    else:
        path = Path(graph)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist")
        label = str(path)
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty, not an ONNX model")
        try:
            proto = onnx.load(label)
        except Exception as error:  # onnx raises DecodeError and others for a broken file
            raise ValueError(f"{path} is not an ONNX model: {error}") from error
    missing = [
        what
        for what, absent in (
            ("IR version", proto.ir_version <= 0),
            ("opset", not proto.opset_import),
            ("node", not proto.graph.node),
            ("output", not proto.graph.output),
        )
        if absent
    ]
    if missing:
        raise ValueError(f"{label} is not an ONNX model: it has no {', no '.join(missing)}")
    return proto, label


@dataclass(frozen=True)
class ScopedNode:
    """A node with where it sits: ``path`` (``""`` in the main graph, ``"loop/body"`` in a
    ``Loop`` node's body), the values that depend on the graph's inputs at that point, and
    the constant tensors its scope can see (initializers, ``Constant`` and ``Identity``)."""

    node: onnx.NodeProto
    path: str
    dynamic: frozenset[str]
    constants: dict[str, Any]

    @property
    def label(self) -> str:
        name = self.node.name or f"<unnamed {self.node.op_type}>"
        return f"{self.path}/{name}" if self.path else name

    def constant(self, name: str) -> np.ndarray | None:
        """The value named ``name`` if it is a constant tensor of the graph, else ``None``."""
        value = self.constants.get(name)
        return None if value is None else require("onnx").numpy_helper.to_array(value)


def walk(graph: onnx.GraphProto) -> Iterator[ScopedNode]:
    """Every node of ``graph`` and of its subgraphs, in graph order."""
    yield from _walk(graph, "", frozenset(), {})


def _walk(
    graph: onnx.GraphProto, path: str, outer_dynamic: frozenset[str], outer_constants: dict
) -> Iterator[ScopedNode]:
    constants = {**outer_constants, **{init.name: init for init in graph.initializer}}
    dynamic = set(outer_dynamic) | {i.name for i in graph.input if i.name not in constants}
    for node in graph.node:
        frozen = frozenset(dynamic)
        yield ScopedNode(node, path, frozen, constants)
        for attribute, sub in _subgraphs(node):
            sub_path = f"{path}/{node.name or node.op_type}/{attribute}".lstrip("/")
            yield from _walk(sub, sub_path, frozen, constants)
        _record(node, frozen, dynamic, constants)


def _record(node: onnx.NodeProto, before: frozenset, dynamic: set, constants: dict) -> None:
    """Mark the node's outputs as dynamic (they depend on an input) or constant."""
    if _is_dynamic(node, before):
        dynamic.update(o for o in node.output if o)
    elif node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        onnx = require("onnx")
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is not None and node.output:
            constants[node.output[0]] = onnx.helper.get_attribute_value(value)
    elif node.op_type == "Identity" and node.input and node.input[0] in constants:
        constants[node.output[0]] = constants[node.input[0]]


def _is_dynamic(node: onnx.NodeProto, dynamic: frozenset[str]) -> bool:
    if node.op_type in _RANDOM_OPS or any(name in dynamic for name in node.input if name):
        return True
    return any(_outputs_dynamic(sub, dynamic) for _, sub in _subgraphs(node))


def _outputs_dynamic(graph: onnx.GraphProto, outer_dynamic: frozenset[str]) -> bool:
    """Whether a subgraph's outputs depend on an input (its own inputs always count as one)."""
    initializers = {init.name for init in graph.initializer}
    dynamic = set(outer_dynamic) | {i.name for i in graph.input if i.name not in initializers}
    for node in graph.node:
        if _is_dynamic(node, frozenset(dynamic)):
            dynamic.update(o for o in node.output if o)
    return any(o.name in dynamic for o in graph.output)


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    onnx = require("onnx")
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for index, sub in enumerate(attribute.graphs):
                yield f"{attribute.name}[{index}]", sub


def is_standard(node: onnx.NodeProto, op_type: str) -> bool:
    """The node is the standard ONNX operator ``op_type`` (not a custom domain's)."""
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


__all__ = ["ScopedNode", "is_standard", "load", "require", "walk"]
