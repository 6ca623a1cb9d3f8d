"""Fold BatchNorm layers into neighbouring convolution and linear layers, for inference.

In eval mode a BN layer is the per-channel affine map ``z_tilde = scale * z + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``
(:mod:`bnstats.torch.fold_weights`). :func:`fold` finds every BN next to a Conv1d/2d/3d,
ConvTranspose1d/2d/3d or Linear with nothing in between and merges the two:

- ``layer -> BN``: the layer's output channels are scaled (always exact);
- ``BN -> layer``: its input channels are scaled and the shift moves into the bias. Exact only
  if every output sums the same, real inputs: never for a transposed conv, and for a conv only
  if it adds no zero padding (zero padding happens AFTER the BN, and BN(0) = shift != 0);
  ``padding_mode`` reflect/replicate/circular pads with copies of BN's output, which commutes.

A pair folds only if the tensor between them goes nowhere else, both modules are called once,
have no hooks or parametrizations and keep torch's own ``forward``, and the BN is in eval mode
with running statistics. BN's dim 1 must be the layer's channel axis: BatchNorm2d/3d force
4-D/5-D input, which proves it next to Conv2d/3d; BatchNorm1d accepts (N, C) and (N, C, L), so
next to a Linear (which acts on the LAST dim) or a Conv1d (which also takes unbatched (C, L)) it
folds only when ``example_inputs`` show the tensor between them to be (N, F) resp. (N, C, L).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from bnstats.torch.fold_report import FoldEntry, FoldReport, Position
from bnstats.torch.fold_trace import FoldTraceError, record_shapes, trace
from bnstats.torch.fold_weights import (
    FoldOverflowError,
    bn_scale_shift,
    fold_after64,
    fold_before64,
    fold_weights,
    fold_weights_before,
    overflow_problem,
)

_BatchNorm = nn.modules.batchnorm._BatchNorm
_ConvTransposeNd = nn.modules.conv._ConvTransposeNd
LazyModuleMixin = nn.modules.lazy.LazyModuleMixin
parametrize = nn.utils.parametrize
Tensor = torch.Tensor
_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def fold(
    model: nn.Module, example_inputs: Tensor | Sequence[object] | None = None
) -> fx.GraphModule:
    """A new module computing ``model``'s eval-mode output with its BN layers folded away.

    ``model`` is deep-copied and left untouched (parameters, buffers, modes). The copy is traced
    with ``torch.fx.symbolic_trace`` semantics; every BN that can be folded exactly is merged
    into its neighbouring layer in float64 and removed, the layer's weights are cast back to
    their dtype. A BN stays when its output depends on the batch (training mode,
    ``track_running_stats=False``), when the merge would be inexact or unprovable, or when the
    folded weights would overflow the layer's dtype (float16: above 65504).

    ``example_inputs`` (a tensor or a tuple of positional arguments) are run once through the
    copy in eval mode to record shapes; they are needed to fold BatchNorm1d, whose channel axis
    depends on the input's rank. Pass inputs of the rank the model will see.

    Returns an ``fx.GraphModule`` with the original's qualified names and training flags and
    the attribute ``fold_report`` (:class:`FoldReport`: per BN, where it went or why it stayed;
    also in ``meta["fold_report"]``, which survives ``copy.deepcopy``).
    Warns when BN layers stayed only because they were in training mode or because
    ``example_inputs`` were missing. Raises :class:`FoldTraceError` if the model cannot be
    traced, ``TypeError``/``ValueError`` for a non-module or failing ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    work = copy.deepcopy(model)
    gm = trace(work, name, leaves=(_BatchNorm, *_LAYERS))
    if example_inputs is not None:
        record_shapes(gm, example_inputs, name)
    entries = _Folder(gm, has_shapes=example_inputs is not None).run(work)
    report = FoldReport(name, entries)
    gm.fold_report = report
    gm.meta["fold_report"] = report  # GraphModule.meta survives copy.deepcopy
    _warn_if_avoidable(report)
    return gm


@dataclass
class _Blocked:
    """Why a BN cannot fold on one side; ``candidate``: a conv/linear layer was there."""

    code: str
    text: str
    candidate: bool


@dataclass
class _Weights:
    """Float64 working copy of one layer's folded parameters."""

    weight: Tensor
    bias: Tensor | None


class _Folder:
    """Walks the traced graph, folds what is exact and records every BN's fate."""

    def __init__(self, gm: fx.GraphModule, has_shapes: bool) -> None:
        self.gm = gm
        self.has_shapes = has_shapes
        self.modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        self.calls = Counter(id(self.modules[n.target]) for n in nodes if n.op == "call_module")
        self.attributes_read = [str(n.target) for n in nodes if n.op == "get_attr"]
        self.pending: dict[str, _Weights] = {}

    def run(self, original: nn.Module) -> list[FoldEntry]:
        results: dict[str, FoldEntry] = {}
        for node in list(self.gm.graph.nodes):
            if self._is_call_of(node, _BatchNorm) and node.target not in results:
                results[node.target] = self._fold_one(node)
        self._write_back()
        self.gm.graph.lint()
        self.gm.recompile()
        entries = []
        for name, module in original.named_modules():
            if isinstance(module, _BatchNorm):
                entries.append(results.get(name) or _not_called(name, module))
        return entries

    # -- one BN ---------------------------------------------------------------------------

    def _fold_one(self, node: fx.Node) -> FoldEntry:
        name, bn = str(node.target), self.modules[node.target]
        kind = type(bn).__name__
        problem = self._bn_problem(name, bn)
        if problem is not None:
            return FoldEntry(name, kind, code=problem[0], reason=problem[1])
        scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if not bool(torch.isfinite(scale).all() and torch.isfinite(shift).all()):
            reason = "running statistics are NaN/Inf or running_var + eps <= 0"
            return FoldEntry(name, kind, code="bad_statistics", reason=reason)
        after = self._try_after(node, bn, scale, shift)
        if isinstance(after, str):
            return FoldEntry(name, kind, folded_into=after, position="after")
        before = self._try_before(node, bn, scale, shift)
        if isinstance(before, str):
            return FoldEntry(name, kind, folded_into=before, position="before")
        main = after if after.candidate or not before.candidate else before
        reason = f"input {after.text}; output {before.text}"
        return FoldEntry(name, kind, code=main.code, reason=reason)

    def _try_after(
        self, node: fx.Node, bn: nn.Module, scale: Tensor, shift: Tensor
    ) -> str | _Blocked:
        """``layer -> BN``: fold into the layer whose output is the BN's only input."""
        src = _only_input(node)
        where = f"comes from {self._describe(src)}"
        if not self._is_call_of(src, _LAYERS):
            return _Blocked("no_layer", f"{where}, not from a conv/linear layer", False)
        layer_name, layer = str(src.target), self.modules[src.target]
        problem = self._layer_problem(layer_name, layer)
        if problem is None:
            others = [self._describe(u) for u in src.users if u is not node]
            if others:
                problem = "shared_tensor", f"whose output also goes to {', '.join(others)}"
        if problem is None:
            problem = self._axis_problem(src, layer_name, layer, bn)
        if problem is not None:
            return _Blocked(problem[0], f"{where}, {problem[1]}", True)
        return self._apply(node, layer_name, layer, scale, shift, "after")

    def _try_before(
        self, node: fx.Node, bn: nn.Module, scale: Tensor, shift: Tensor
    ) -> str | _Blocked:
        """``BN -> layer``: fold into the layer that is the BN output's only user."""
        users = list(node.users)
        if len(users) != 1:
            places = ", ".join(self._describe(u) for u in users) or "nowhere"
            candidate = any(self._is_call_of(u, _LAYERS) for u in users)
            code = "shared_tensor" if len(users) > 1 else "no_layer"
            return _Blocked(code, f"goes to {len(users)} places: {places}", candidate)
        dst = users[0]
        where = f"goes to {self._describe(dst)}"
        if not self._is_call_of(dst, _LAYERS) or _only_input(dst) is not node:
            return _Blocked("no_layer", f"{where}, not to a conv/linear layer", False)
        layer_name, layer = str(dst.target), self.modules[dst.target]
        problem = self._layer_problem(layer_name, layer) or _before_problem(layer)
        if problem is None:
            problem = self._axis_problem(node, layer_name, layer, bn)
        if problem is not None:
            return _Blocked(problem[0], f"{where}, {problem[1]}", True)
        return self._apply(node, layer_name, layer, scale, shift, "before")

    def _apply(
        self,
        node: fx.Node,
        layer_name: str,
        layer: nn.Module,
        scale: Tensor,
        shift: Tensor,
        position: Position,
    ) -> str | _Blocked:
        """Fold in float64 unless a result overflows the layer's dtype; rewire the graph."""
        current = self.pending.get(layer_name) or _Weights(
            _as64(layer.weight), None if layer.bias is None else _as64(layer.bias)
        )
        groups = layer_groups(layer)
        try:
            if position == "after":
                transposed = isinstance(layer, _ConvTransposeNd)
                w, b = fold_after64(current.weight, current.bias, scale, shift, transposed, groups)
            else:
                w, b = fold_before64(current.weight, current.bias, scale, shift, groups)
        except ValueError as exc:
            raise ValueError(f"fold: cannot fold {node.target} into {layer_name}: {exc}") from exc
        bias_dtype = layer.weight.dtype if layer.bias is None else layer.bias.dtype
        for what, value, dtype in (("weight", w, layer.weight.dtype), ("bias", b, bias_dtype)):
            problem = overflow_problem(value, dtype)
            if problem is not None:
                text = f"could fold into {layer_name}, but the folded {what} {problem}"
                return _Blocked("overflow", text, True)
        self.pending[layer_name] = _Weights(w, b)
        self._remove(node, position)
        return layer_name

    def _remove(self, node: fx.Node, position: Position) -> None:
        """Take the BN node out of the graph and its module out of the model."""
        bn_input = _only_input(node)
        if position == "after":
            node.replace_all_uses_with(bn_input)
        else:
            next(iter(node.users)).replace_input_with(node, bn_input)
        self.gm.graph.erase_node(node)
        self.gm.delete_submodule(str(node.target))

    def _write_back(self) -> None:
        """Cast every folded layer's float64 parameters back to its dtype and device."""
        for name, folded in self.pending.items():
            layer = self.modules[name]
            old_w, old_b = layer.weight, layer.bias
            b_like = old_w if old_b is None else old_b
            layer.weight = nn.Parameter(
                folded.weight.to(old_w.device, old_w.dtype), requires_grad=old_w.requires_grad
            )
            layer.bias = nn.Parameter(
                folded.bias.to(b_like.device, b_like.dtype), requires_grad=b_like.requires_grad
            )

    # -- checks -----------------------------------------------------------------------------

    def _bn_problem(self, name: str, bn: nn.Module) -> tuple[str, str] | None:
        if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
            return "bn_unsupported", "is a lazy module that was never run"
        if bn.running_mean is None or bn.running_var is None:
            return "no_running_stats", (
                "has no running statistics (track_running_stats=False): it always normalizes "
                "with the batch's own mean and variance"
            )
        if bn.training:
            return "training", (
                "is in training mode: its output depends on the batch; call model.eval() "
                "before fold (the folded model represents eval behaviour)"
            )
        if type(bn).forward not in _BN_FORWARDS:
            return "bn_unsupported", f"{type(bn).__name__} overrides forward"
        return self._shared_problem("bn_unsupported", name, bn)

    def _layer_problem(self, name: str, layer: nn.Module) -> tuple[str, str] | None:
        """Why this conv/linear cannot take a BN in: ``(code, "which ...")`` or None."""
        code = "layer_unsupported"
        base = next(cls for cls in _LAYERS if isinstance(layer, cls))
        if type(layer).forward is not base.forward:
            return code, f"which overrides {base.__name__}.forward"
        if parametrize.is_parametrized(layer):
            return code, "which has a parametrized weight"
        if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            return code, "which is a lazy module that was never run"
        problem = self._shared_problem(code, name, layer)
        return None if problem is None else (code, f"which {problem[1]}")

    def _shared_problem(self, code: str, name: str, module: nn.Module) -> tuple[str, str] | None:
        """Hooks, several calls or direct reads would see the folded weights too."""
        if module._forward_hooks or module._forward_pre_hooks:
            return code, "has forward hooks"
        calls = self.calls[id(module)]
        if calls != 1:
            return code, f"is called {calls} times in forward"
        if any(t == name or t.startswith(name + ".") for t in self.attributes_read):
            return code, "has parameters or buffers read directly in forward"
        return None

    def _axis_problem(
        self, between: fx.Node, layer_name: str, layer: nn.Module, bn: nn.Module
    ) -> tuple[str, str] | None:
        """BN normalizes dim 1; is dim 1 the layer's channel axis here? ``(code, "but ...")``."""
        rank = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()
        meaning = (
            f"{type(bn).__name__} normalizes dim 1, which holds {layer_name}'s channels only "
            f"in {rank}-D tensors"
        )
        if self.has_shapes:
            meta = between.meta.get("tensor_meta")
            shape = tuple(meta.shape) if hasattr(meta, "shape") else None
            if shape is not None and len(shape) == rank:
                return None
            return "channel_axis", f"but the tensor between them has shape {shape}: {meaning}"
        if _bn_rank(bn) == rank:
            return None
        return "needs_example_inputs", (
            f"but {meaning}; pass example_inputs to fold so that it can check the shape"
        )

    # -- graph helpers ----------------------------------------------------------------------

    def _is_call_of(self, node: fx.Node | None, types: type | tuple[type, ...]) -> bool:
        return (
            node is not None
            and node.op == "call_module"
            and isinstance(self.modules.get(str(node.target)), types)
        )

    def _describe(self, node: fx.Node | None) -> str:
        if node is None:
            return "a call with several arguments"
        if node.op == "call_module":
            return f"{node.target} ({type(self.modules[node.target]).__name__})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        if node.op == "call_method":
            return f".{node.target}()"
        if node.op == "placeholder":
            return f"the model's input {node.target!r}"
        if node.op == "output":
            return "the model's output"
        return f"the attribute {node.target}"


def layer_groups(layer: nn.Module) -> int:
    """``groups`` of a conv, 1 for a linear layer."""
    return int(getattr(layer, "groups", 1))


def _before_problem(layer: nn.Module) -> tuple[str, str] | None:
    """Why ``layer(BN(x))`` is not one layer even though both could fold: ``(code, "which ...")``.

    Exact iff every output sums a fixed set of real (unpadded) inputs: zero padding is added
    AFTER the BN and BN(0) = shift != 0; reflect/replicate/circular padding copies BN outputs,
    which commutes with a per-channel affine map.
    """
    if isinstance(layer, _ConvTransposeNd):
        return "layer_unsupported", (
            "which is a transposed conv: its outputs sum varying numbers of inputs, so the "
            "BN's shift is not a constant bias"
        )
    if isinstance(layer, nn.Linear) or layer.padding_mode != "zeros":
        return None
    if isinstance(layer.padding, str):
        sizes = zip(layer.dilation, layer.kernel_size, strict=True)
        amounts = [0] if layer.padding == "valid" else [d * (k - 1) for d, k in sizes]
    else:
        amounts = list(layer.padding)
    if any(amounts):
        return "padding", (
            f"which pads with zeros (padding={layer.padding}) after the BN, where "
            "BN(0) = beta - gamma * running_mean / sqrt(running_var + eps) is not 0"
        )
    return None


def _bn_rank(bn: nn.Module) -> int | None:
    """The only input rank this BN accepts, if its class fixes one (BatchNorm2d: 4, 3d: 5)."""
    for cls, rank in ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)):
        if isinstance(bn, cls) and type(bn)._check_input_dim is cls._check_input_dim:
            return rank
    return None


def _only_input(node: fx.Node) -> fx.Node | None:
    args = [*node.args, *node.kwargs.values()]
    if len(args) == 1 and isinstance(args[0], fx.Node):
        return args[0]
    return None


def _not_called(name: str, bn: nn.Module) -> FoldEntry:
    reason = "is never called in forward, so the traced model does not contain it"
    return FoldEntry(name, type(bn).__name__, code="not_called", reason=reason)


def _as64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _warn_if_avoidable(report: FoldReport) -> None:
    """Warn when the caller could have folded more: eval mode, example_inputs."""
    hints = {
        "training": "are in training mode; call model.eval() before fold",
        "needs_example_inputs": "need example_inputs to check their channel axis",
    }
    for code, hint in hints.items():
        names = [e.name for e in report.kept if e.code == code]
        if names:
            warnings.warn(
                f"fold({report.model}): {len(names)} BatchNorm layer(s) kept because they "
                f"{hint}: {', '.join(names)}",
                UserWarning,
                stacklevel=3,
            )


__all__ = [
    "FoldEntry",
    "FoldOverflowError",
    "FoldReport",
    "FoldTraceError",
    "fold",
    "fold_weights",
    "fold_weights_before",
]
