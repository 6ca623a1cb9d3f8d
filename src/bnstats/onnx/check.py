"""``check_export``: does an ONNX file still compute what the model computes now?

torch's default exporter folds each BN layer into the convolution or linear layer before it,
so a plain ``torch.onnx.export`` of an eval-mode resnet18 has no ``BatchNormalization`` node:
the statistics live on only inside the folded weights, and a graph exported before
``bt.recalibrate`` carries the old ones without any node to inspect. ``check_export`` runs the
graph in onnxruntime and compares its outputs with the model's current eval output (the
tolerance of :mod:`bnstats.onnx._agreement`), and says which BN layers look stale:

- a BN layer still present as a node is compared with the layer (:func:`check_batchnorm_nodes`);
- a BN layer that a convolution or linear layer absorbs (``layer -> BN``, as ``bt.fold`` finds
  it) is looked for in the graph: a weight tensor of the layer's shape that is the layer's own
  weight with each output channel scaled, ``T[o] = r[o] * weight[o]``. Folded with the current
  statistics, ``r = gamma / sqrt(running_var + eps)`` and the bias is
  ``(bias_conv - running_mean) * r + beta``; another ``r`` means running_var (or gamma, or the
  weight) changed since the export, another bias running_mean (or beta).

What cannot be known: which values the statistics had at the export (the graph holds only
their product with the weights), nor anything about BN layers folded in ways other than
``layer -> BN`` (``bt.fold``'s ``BN -> layer`` and ``layer(x) + BN(x)``); those are reported
as not located, never as current. Which layer absorbs which BN comes from tracing the model
with torch.fx (as ``bt.fold`` does): for a model that cannot be traced (data-dependent control
flow) the outputs and the BN nodes are still compared, and the result says that folded layers
were not looked for. When the outputs differ and no BN layer is found stale, the message says
whether every BN layer was found current or the cause could not be located.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnstats.onnx._agreement import (
    DEFAULT_FACTOR,
    DEFAULT_RTOL,
    Agreement,
    OnnxExportError,
    check_tolerances,
    positional,
    reference_outputs,
    run_onnxruntime,
)
from bnstats.onnx._graph import ScopedNode, is_standard, load, walk
from bnstats.onnx._modes import in_eval_mode
from bnstats.onnx.nodes import BatchNormNodes, check_batchnorm_nodes, layer_label

_SAME = 1e-4  # relative: the exporter's float32 folding is ~1e-7 from bnstats' float64 one
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class LayerStatus:
    """A BN layer of the model that is no ``BatchNormalization`` node of the graph, absorbed by
    ``folded_into`` (``None``: ``bt.fold`` keeps it): ``status`` is ``"current"``, ``"stale"``
    or ``"not located"`` (no tensor of the graph is that layer's weight, scaled, or it was not
    looked for), with why."""

    layer: str
    folded_into: str | None
    status: str
    detail: str = ""

    def __str__(self) -> str:
        where = "" if self.folded_into is None else f" (folded into {self.folded_into})"
        detail = f": {self.detail}" if self.detail else ""
        return f"{layer_label(self.layer)}{where}: {self.status}{detail}"


@dataclass
class ExportCheck:
    """What :func:`check_export` found: ``ok`` when the graph's outputs agree with the model's
    current eval output (``agreement``, each output on its own), its BN nodes are fine
    (``batchnorm_nodes``) and no folded layer looks stale (``layers``). ``not_traced``: why
    the BN layers folded into weights were not looked for (the model cannot be traced by
    torch.fx), empty when they were. ``message`` is one line, ``str`` the details."""

    path: str
    agreement: Agreement
    batchnorm_nodes: BatchNormNodes
    layers: list[LayerStatus] = field(default_factory=list)
    not_traced: str = ""

    @property
    def stale(self) -> list[str]:
        """The BN layers whose statistics look changed since the export, in model order
        (``""`` is the model itself, when it is one BN layer)."""
        from_nodes = [
            n.layer for n in self.batchnorm_nodes.nodes if n.problems and n.layer is not None
        ]
        return list(
            dict.fromkeys(from_nodes + [s.layer for s in self.layers if s.status == "stale"])
        )

    @property
    def ok(self) -> bool:
        return self.agreement.ok and self.batchnorm_nodes.ok and not self.stale

    @property
    def message(self) -> str:
        measured = f"({self.agreement.summary()})"
        if self.ok:
            return f"{self.path} computes the model's eval output {measured}; {self._found()}"
        verdict = "agrees with" if self.agreement.ok else "differs from"
        return f"{self.path} {verdict} the model's eval output {measured}; {self._cause()}"

    def _found(self) -> str:
        if self.not_traced:
            return "BN layers folded into weights not looked for (torch.fx cannot trace the model)"
        current = sum(s.status == "current" for s in self.layers)
        return f"{current} folded BN layer(s) found with their current statistics"

    def _cause(self) -> str:
        """Why the check failed, as far as it can tell."""
        stale = self.stale
        if stale:
            return f"statistics look stale in {len(stale)} BN layer(s): {_first(stale)}"
        if not self.batchnorm_nodes.ok:
            problems = self.batchnorm_nodes.problems()
            return f"{len(problems)} BatchNormalization node problem(s): {problems[0]}"
        if self.not_traced:
            return (
                "the cause could not be located: torch.fx cannot trace the model, so BN layers "
                "folded into weights were not looked for"
            )
        unlocated = [s.layer for s in self.layers if s.status == "not located"]
        if unlocated:
            return (
                f"the cause could not be located: no BN layer found stale, {len(unlocated)} "
                f"not located ({_first(unlocated)})"
            )
        return (
            "every BN layer was found with its current statistics "
            "(weights, the model or its code changed?)"
        )

    def to_dict(self) -> dict[str, Any]:
        a = self.agreement
        return {
            "ok": self.ok,
            "message": self.message,
            "stale": self.stale,
            "graph_error": a.graph_error,
            "torch_error": a.torch_error,
            "allowed": a.allowed,
            "reference": a.reference,
            "outputs": [
                {"ok": o.ok, **{k: v for k, v in vars(o).items() if k not in ("rtol", "factor")}}
                for o in a.outputs
            ],
            "batchnorm_nodes": self.batchnorm_nodes.to_dict(),
            "layers": [vars(s) for s in self.layers],
            "not_traced": self.not_traced,
        }

    def __str__(self) -> str:
        lines = [self.message] + [f"  {line}" for line in str(self.agreement).splitlines()]
        lines += [f"  {line}" for line in self.batchnorm_nodes.problems()]
        if self.not_traced:
            lines.append(f"  BN layers folded into weights not looked for: {self.not_traced}")
        lines += [f"  {s}" for s in self.layers if s.status != "current"]
        return "\n".join(lines)


def _first(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(map(layer_label, names[:shown])) + (f" and {more} more" if more > 0 else "")


def check_export(
    path: str | Path,
    model: Any,
    example_inputs: Any,
    *,
    rtol: float = DEFAULT_RTOL,
    factor: float = DEFAULT_FACTOR,
) -> ExportCheck:
    """Run the ONNX graph at ``path`` on ``example_inputs`` and compare it with ``model``'s
    current eval output, as :func:`export_folded` does (``rtol``, ``factor``: see
    :class:`Agreement`); say which BN layers look stale (the module docstring says how, and
    what cannot be known). The model is left as found. Returns :class:`ExportCheck`; a file
    that is no ONNX model, or outputs of other shapes, raise a ``ValueError``."""

    check_tolerances(rtol, factor)
    proto, label = load(path)
    args = positional(example_inputs)
    with in_eval_mode(model):
        reference = reference_outputs(model, args)
        entries, not_traced = _fold_entries(model, args)
    source = label if label != "<ModelProto>" else proto.SerializeToString()
    agreement = reference.agreement(run_onnxruntime(source, args), rtol, factor)
    nodes = check_batchnorm_nodes(proto, model)
    in_nodes = {n.layer for n in nodes.nodes if n.layer is not None}
    tensors = _weights(list(walk(proto.graph)))
    # A BN node matched to no layer may be any layer's: its conv then holds the bare weight.
    bare_is_ambiguous = any(n.layer is None for n in nodes.nodes)
    layers = [
        _locate(entry, model, tensors, bare_is_ambiguous)
        if entry.position == "after"
        else _not_looked_for(entry)
        for entry in entries
        if entry.name not in in_nodes
    ]
    return ExportCheck(label, agreement, nodes, layers, not_traced)


def _fold_entries(model: Any, args: tuple) -> tuple[list[Any], str]:
    """What ``bt.fold`` would do with each BN layer (its report's entries, naming the layer
    that absorbs each), or none and why that cannot be known: torch.fx cannot trace the model
    (the first line of fold's :class:`~bnstats.torch.FoldTraceError`). A model that is itself
    one BN layer has no layer to fold into."""
    import bnstats.torch as bt

    if bt.is_batchnorm(bt.unwrap(model)):
        return [], ""
    try:
        return bt.fold(model, args).fold_report.entries, ""
    except bt.FoldTraceError as error:
        return [], str(error).splitlines()[0]


def _not_looked_for(entry: Any) -> LayerStatus:
    """A BN that ``bt.fold`` keeps or folds other than ``layer -> BN``, and no node of the
    graph: its statistics are not read back from the graph."""
    if not entry.folded:
        detail = "no BatchNormalization node matches it and bt.fold keeps it: not looked for"
    else:
        detail = f"folded {entry.position} it (only a BN folded after its layer is read back)"
    return LayerStatus(entry.name, entry.folded_into, "not located", detail)


@dataclass(frozen=True)
class _Weight:
    weight: np.ndarray  # in torch's layout (out, in, ...)
    bias: np.ndarray | None


def _weights(scoped: list[ScopedNode]) -> list[_Weight]:
    """The constant weights (and biases) of every Conv, Gemm and MatMul node of the graph."""
    found = []
    for s in scoped:
        op = next((op for op in _WEIGHT_INPUT if is_standard(s.node, op)), None)
        if op is None or len(s.node.input) < 2:
            continue
        weight = s.constant(s.node.input[1])
        if weight is None:
            continue
        if op == "MatMul" or (op == "Gemm" and not _attribute(s.node, "transB")):
            weight = weight.T  # x @ W: torch's Linear weight transposed
        bias = s.constant(s.node.input[2]) if len(s.node.input) > 2 and op != "MatMul" else None
        found.append(
            _Weight(weight.astype(np.float64), None if bias is None else bias.astype(np.float64))
        )
    return found


def _attribute(node: Any, name: str) -> Any:
    from bnstats.onnx._graph import require

    attribute = next((a for a in node.attribute if a.name == name), None)
    return None if attribute is None else require("onnx").helper.get_attribute_value(attribute)


def _locate(entry: Any, model: Any, tensors: list[_Weight], bare_is_ambiguous: bool) -> LayerStatus:
    """Is the BN layer ``entry.name`` in the graph, folded into ``entry.folded_into``, with the
    statistics it has now? With ``bare_is_ambiguous``, the layer's own weight unscaled is not
    taken for a fold (the BN may be one of the graph's unmatched nodes)."""
    modules = dict(_unwrap(model).named_modules())
    layer, bn = modules[entry.folded_into], modules[entry.name]
    weight = layer.weight.detach().cpu().double().numpy()
    scale, shift = _scale_and_shift(bn)
    conv_bias = 0.0 if layer.bias is None else layer.bias.detach().cpu().double().numpy()
    expected_bias = (conv_bias - shift[0]) * scale + shift[1]
    best: tuple[float, LayerStatus] | None = None
    for tensor in tensors:
        ratios = _channel_ratios(tensor.weight, weight)
        unscaled = ratios is not None and np.allclose(ratios, 1.0, rtol=0, atol=_SAME)
        bare = unscaled and bare_is_ambiguous and not np.allclose(scale, 1, rtol=0, atol=_SAME)
        if ratios is None or bare:
            continue  # another layer's weight, or this one with the BN left outside it
        off = float(np.max(np.abs(ratios / scale - 1.0), initial=0.0))
        status = _status(entry, off, tensor.bias, expected_bias)
        if best is None or off < best[0]:
            best = (off, status)
    if best is None:
        return LayerStatus(
            entry.name, entry.folded_into, "not located", "no tensor is its scaled weight"
        )
    return best[1]


def _status(entry: Any, off: float, bias: np.ndarray | None, expected: np.ndarray) -> LayerStatus:
    if off > _SAME:
        detail = (
            f"the graph scales the filters by up to {off:.2g} relative from gamma / "
            f"sqrt(running_var + eps) now (running_var, gamma or the weight changed)"
        )
        return LayerStatus(entry.name, entry.folded_into, "stale", detail)
    if bias is not None and bias.shape == np.shape(expected):
        gap = float(np.max(np.abs(bias - expected), initial=0.0))
        size = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
        if gap > _SAME * size:
            detail = f"the folded bias is up to {gap:.2g} off (running_mean or beta changed)"
            return LayerStatus(entry.name, entry.folded_into, "stale", detail)
    return LayerStatus(entry.name, entry.folded_into, "current")


def _channel_ratios(tensor: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """``r`` with ``tensor[o] = r[o] * weight[o]`` for every output channel ``o``, or None."""
    if tensor.shape != weight.shape:
        return None
    flat_t = tensor.reshape(len(tensor), -1)
    flat_w = weight.reshape(len(weight), -1)
    norms = np.einsum("ij,ij->i", flat_w, flat_w)
    if np.any(norms == 0):
        return None
    ratios = np.einsum("ij,ij->i", flat_t, flat_w) / norms
    residual = np.abs(flat_t - ratios[:, None] * flat_w).max()
    return ratios if residual <= _SAME * max(np.abs(flat_t).max(), 1e-30) else None


def _scale_and_shift(bn: Any) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``gamma / sqrt(running_var + eps)`` and ``(running_mean, beta)`` of a BN layer."""
    var = bn.running_var.detach().cpu().double().numpy()
    mean = bn.running_mean.detach().cpu().double().numpy()
    gamma = (
        1.0 if getattr(bn, "weight", None) is None else bn.weight.detach().cpu().double().numpy()
    )
    beta = 0.0 if getattr(bn, "bias", None) is None else bn.bias.detach().cpu().double().numpy()
    return gamma / np.sqrt(var + bn.eps), (mean, beta + 0.0 * mean)


def _unwrap(model: Any) -> Any:
    import bnstats.torch as bt

    return bt.unwrap(model)


__all__ = ["ExportCheck", "LayerStatus", "OnnxExportError", "check_export"]
