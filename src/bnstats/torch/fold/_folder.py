"""The graph walk of :func:`bnstats.torch.fold`: every BN's fate, folded pairs rewired."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from bnstats.torch.fold._report import FoldEntry
from bnstats.torch.fold._weights import (
    Position,
    bn_scale_shift,
    fold_after64,
    fold_before64,
    overflow_problem,
)

_BatchNorm = nn.modules.batchnorm._BatchNorm
_ConvTransposeNd = nn.modules.conv._ConvTransposeNd
LazyModuleMixin = nn.modules.lazy.LazyModuleMixin
parametrize = nn.utils.parametrize
Tensor = torch.Tensor
LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@dataclass
class _Weights:
    """Float64 working copy of one layer's folded parameters."""

    weight: Tensor
    bias: Tensor | None


class GraphFolder:
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
        after = self._try_after(node, FoldEntry(name, kind), bn, scale, shift)
        if after.folded:
            return after
        before = self._try_before(node, FoldEntry(name, kind), bn, scale, shift)
        if before.folded:
            return before
        main = after if _had_layer(after) or not _had_layer(before) else before
        reason = f"input {after.reason}; output {before.reason}"
        return replace(main, reason=reason)

    def _try_after(
        self, node: fx.Node, entry: FoldEntry, bn: nn.Module, scale: Tensor, shift: Tensor
    ) -> FoldEntry:
        """``layer -> BN``: fold into the layer whose output is the BN's only input."""
        src = _only_input(node)
        where = f"comes from {self._describe(src)}"
        if not self._is_call_of(src, LAYERS):
            return _kept(entry, "no_layer", f"{where}, not from a conv/linear layer")
        layer_name, layer = str(src.target), self.modules[src.target]
        problem = self._layer_problem(layer_name, layer)
        if problem is None:
            others = [self._describe(u) for u in src.users if u is not node]
            if others:
                problem = "shared_tensor", f"whose output also goes to {', '.join(others)}"
        if problem is None:
            problem = self._axis_problem(src, layer_name, layer, bn)
        if problem is not None:
            return _kept(entry, problem[0], f"{where}, {problem[1]}")
        return self._apply(node, entry, layer_name, layer, scale, shift, "after")

    def _try_before(
        self, node: fx.Node, entry: FoldEntry, bn: nn.Module, scale: Tensor, shift: Tensor
    ) -> FoldEntry:
        """``BN -> layer``: fold into the layer that is the BN output's only user."""
        users = list(node.users)
        if len(users) != 1:
            places = ", ".join(self._describe(u) for u in users) or "nowhere"
            to_layer = any(self._is_call_of(u, LAYERS) for u in users)
            code = "shared_tensor" if len(users) > 1 and to_layer else "no_layer"
            return _kept(entry, code, f"goes to {len(users)} places: {places}")
        dst = users[0]
        where = f"goes to {self._describe(dst)}"
        if not self._is_call_of(dst, LAYERS) or _only_input(dst) is not node:
            return _kept(entry, "no_layer", f"{where}, not to a conv/linear layer")
        layer_name, layer = str(dst.target), self.modules[dst.target]
        problem = self._layer_problem(layer_name, layer) or _before_problem(layer)
        if problem is None:
            problem = self._axis_problem(node, layer_name, layer, bn)
        if problem is not None:
            return _kept(entry, problem[0], f"{where}, {problem[1]}")
        return self._apply(node, entry, layer_name, layer, scale, shift, "before")

    def _apply(
        self,
        node: fx.Node,
        entry: FoldEntry,
        layer_name: str,
        layer: nn.Module,
        scale: Tensor,
        shift: Tensor,
        position: Position,
    ) -> FoldEntry:
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
                return _kept(entry, "overflow", text)
        self.pending[layer_name] = _Weights(w, b)
        self._remove(node, position)
        return replace(entry, folded_into=layer_name, position=position)

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
        base = next(cls for cls in LAYERS if isinstance(layer, cls))
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


def _kept(entry: FoldEntry, code: str, reason: str) -> FoldEntry:
    return replace(entry, code=code, reason=reason)


def _had_layer(entry: FoldEntry) -> bool:
    """A conv/linear layer was on this side of the kept BN (its reason is the one to give)."""
    return entry.code != "no_layer"


def _not_called(name: str, bn: nn.Module) -> FoldEntry:
    reason = "is never called in forward, so the traced model does not contain it"
    return FoldEntry(name, type(bn).__name__, code="not_called", reason=reason)


def _as64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


__all__ = ["LAYERS", "GraphFolder"]
