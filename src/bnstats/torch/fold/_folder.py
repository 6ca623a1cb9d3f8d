"""The graph walk of :func:`bnstats.torch.fold`: every BN's fate, folded pairs rewired."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from bnstats.torch._layers import is_batchnorm
from bnstats.torch.fold._beside import additive_layer, beside_problem, is_add
from bnstats.torch.fold._kinds import (
    LAYERS,
    hooks_of,
    is_norm,
    known_norm_forward,
    layer_computation_problem,
    norm_rank,
    running_statistics,
    tail_names,
)
from bnstats.torch.fold._report import FoldEntry
from bnstats.torch.fold._weights import (
    FoldOverflowError,
    Position,
    as_float64,
    cast_back,
    fold_weights,
    statistics_problem,
    weight_layout,
)

LazyModuleMixin = nn.modules.lazy.LazyModuleMixin
parametrize = nn.utils.parametrize
Tensor = torch.Tensor
Problem = tuple[str, str]
"""``(code, text)``: why something does not fold, with a stable code for the report."""


@dataclass(frozen=True)
class _Folded:
    """One layer's parameters after the BNs folded into it so far: exact in float64 (what the
    next BN folds into) and cast back to the layer's dtypes (what the layer gets)."""

    weight64: Tensor
    bias64: Tensor
    weight: Tensor
    bias: Tensor


class GraphFolder:
    """Walks the traced graph, folds what is exact and records every BN's fate."""

    def __init__(self, gm: fx.GraphModule, has_shapes: bool) -> None:
        self.gm = gm
        self.has_shapes = has_shapes
        self.modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        self.calls = Counter(id(self.modules[n.target]) for n in nodes if n.op == "call_module")
        self.attributes_read = [str(n.target) for n in nodes if n.op == "get_attr"]
        self.pending: dict[str, _Folded] = {}
        self.beside_candidates: list[tuple[fx.Node, FoldEntry]] = []

    def run(self, original: nn.Module) -> list[FoldEntry]:
        results: dict[str, FoldEntry] = {}
        for node in list(self.gm.graph.nodes):
            if self._is_call_of(node, is_norm) and node.target not in results:
                results[node.target] = self._fold_one(node)
        for node, entry in self.beside_candidates:  # after the layers' own BNs
            results[entry.name] = self._try_beside(node, entry)
        self._write_back()
        self.gm.graph.lint()
        self.gm.recompile()
        entries = []
        for name, module in original.named_modules():
            if is_norm(module):
                entries.append(results.get(name) or _not_called(name, module))
        return entries

    # -- one BN ---------------------------------------------------------------------------

    def _fold_one(self, node: fx.Node) -> FoldEntry:
        name, bn = str(node.target), self.modules[node.target]
        entry = FoldEntry(name, type(bn).__name__)
        problem = self._bn_problem(name, bn)
        if problem is not None:
            return _kept(entry, *problem)
        bad = statistics_problem(*_bn_arguments(bn))
        if bad is not None:
            return _kept(entry, "bad_statistics", bad)
        after = self._try_after(node, entry)
        if after.folded:
            return after
        before = self._try_before(node, entry)
        if before.folded:
            return before
        main = after if _had_layer(after) or not _had_layer(before) else before
        kept = replace(main, reason=f"input {after.reason}; output {before.reason}")
        self.beside_candidates.append((node, kept))
        return kept

    def _try_after(self, node: fx.Node, entry: FoldEntry) -> FoldEntry:
        """``layer -> BN``: fold into the layer whose output is the BN's only input."""
        src = _only_input(node)
        where = f"comes from {self._describe(src)}"
        if not self._is_call_of(src, LAYERS):
            return _kept(entry, "no_layer", f"{where}, not from a conv/linear layer")
        layer_name = str(src.target)
        problem = self._layer_problem(layer_name, self.modules[layer_name])
        others = [self._describe(u) for u in src.users if u is not node]
        if problem is None and others:
            problem = "shared_tensor", f"whose output also goes to {', '.join(others)}"
        return self._fold_pair(node, entry, src, layer_name, where, problem, "after")

    def _try_before(self, node: fx.Node, entry: FoldEntry) -> FoldEntry:
        """``BN -> layer``: fold into the layer that is the BN output's only user."""
        users = list(node.users)
        tail = tail_names(self.modules[node.target])
        if tail:
            return _kept(
                entry,
                "norm_act",
                f"goes through its own {' and '.join(tail)} after normalizing, so only a "
                "layer before it can absorb it",
            )
        if len(users) != 1:
            places = ", ".join(self._describe(u) for u in users) or "nowhere"
            to_layer = any(self._is_call_of(u, LAYERS) for u in users)
            code = "shared_tensor" if len(users) > 1 and to_layer else "no_layer"
            return _kept(entry, code, f"goes to {len(users)} places: {places}")
        dst = users[0]
        where = f"goes to {self._describe(dst)}"
        if not self._is_call_of(dst, LAYERS) or _only_input(dst) is not node:
            return _kept(entry, "no_layer", f"{where}, not to a conv/linear layer")
        layer_name = str(dst.target)
        layer = self.modules[layer_name]
        problem = self._layer_problem(layer_name, layer) or _before_problem(layer)
        return self._fold_pair(node, entry, node, layer_name, where, problem, "before")

    def _try_beside(self, node: fx.Node, entry: FoldEntry) -> FoldEntry:
        """``layer(x) + BN(x)``: fold into a layer that reads the BN's input and whose output
        is summed with the BN's (``_beside.py``). ``entry`` stands if there is no such layer;
        if there is one that cannot take the BN in, ``entry`` with that reason added."""
        users, x = list(node.users), _only_input(node)
        if tail_names(self.modules[str(node.target)]) or len(users) != 1 or x is None:
            return entry
        total = users[0]
        others = [arg for arg in total.args if arg is not node] if is_add(total) else []
        if len(others) != 1:
            return entry
        found = additive_layer(
            others[0],
            x,
            lambda n: self._is_call_of(n, LAYERS),
            lambda n: self._is_call_of(n, (nn.Identity,)),
        )
        if found is None:
            return entry
        found, identities = found
        layer_name, bn = str(found.target), self.modules[str(node.target)]
        layer = self.modules[layer_name]
        problem = (
            self._layer_problem(layer_name, layer)
            or self._identities_problem(identities)
            or self._axis_problem(x, layer_name, layer, bn)
        )
        unlike = beside_problem(layer)
        if problem is None and unlike is not None:
            problem = "layer_unsupported", f"which {unlike}"
        if problem is None:
            folded = self._apply(node, replace(entry, code=None, reason=None), layer_name, "beside")
            if folded.folded:
                return folded
            problem = str(folded.code), str(folded.reason)
        return replace(
            entry, reason=f"{entry.reason}; beside it {self._describe(found)}, {problem[1]}"
        )

    def _fold_pair(
        self,
        node: fx.Node,
        entry: FoldEntry,
        between: fx.Node,
        layer_name: str,
        where: str,
        problem: Problem | None,
        position: Position,
    ) -> FoldEntry:
        """Fold unless ``problem`` or the channel axis (of the tensor ``between``) forbid it."""
        bn = self.modules[str(node.target)]
        if problem is None:
            problem = self._axis_problem(between, layer_name, self.modules[layer_name], bn)
        if problem is not None:
            return _kept(entry, problem[0], f"{where}, {problem[1]}")
        return self._apply(node, entry, layer_name, position)

    def _apply(
        self, node: fx.Node, entry: FoldEntry, layer_name: str, position: Position
    ) -> FoldEntry:
        """Fold with :func:`fold_weights` in float64 (into what earlier BNs left of the layer),
        unless a result overflows the layer's dtype; rewire the graph."""
        layer = self.modules[layer_name]
        bias_like = layer.weight if layer.bias is None else layer.bias
        current = self.pending.get(layer_name)
        if current is not None:
            weight64, bias64 = current.weight64, current.bias64
        else:
            weight64 = as_float64(layer.weight)
            bias64 = None if layer.bias is None else as_float64(layer.bias)
        transposed, groups = weight_layout(layer)
        try:
            w64, b64 = fold_weights(
                weight64,
                bias64,
                *_bn_arguments(self.modules[str(node.target)]),
                position=position,
                transposed=transposed,
                groups=groups,
            )
            weight, bias = cast_back(w64, layer.weight, "weight"), cast_back(b64, bias_like, "bias")
        except FoldOverflowError as exc:
            return _kept(entry, "overflow", f"could fold into {layer_name}, but {exc}")
        except ValueError as exc:
            raise ValueError(f"fold: cannot fold {node.target} into {layer_name}: {exc}") from exc
        self.pending[layer_name] = _Folded(w64, b64, weight, bias)
        self._remove(node, position)
        return replace(entry, folded_into=layer_name, position=position)

    def _remove(self, node: fx.Node, position: Position) -> None:
        """Take the BN node out of the graph and its module out of the model; a BN with its
        own drop/act (always folded ``after``) is replaced by them, under its name."""
        name = str(node.target)
        tail = tail_names(self.modules[name])
        if tail:
            bn = self.modules[name]
            kept = nn.Sequential(OrderedDict((key, bn._modules[key]) for key in tail))
            kept.train(bn.training)
            self.gm.add_submodule(name, kept)
            self.modules[name] = kept
            return
        bn_input = _only_input(node)
        if position == "after":
            node.replace_all_uses_with(bn_input)
        elif position == "before":
            next(iter(node.users)).replace_input_with(node, bn_input)
        else:  # layer(x) + BN(x): the sum is the other summand alone
            total = next(iter(node.users))
            total.replace_all_uses_with(next(arg for arg in total.args if arg is not node))
            self.gm.graph.erase_node(total)
        self.gm.graph.erase_node(node)
        self.gm.delete_submodule(str(node.target))

    def _write_back(self) -> None:
        """Give every folded layer its new parameters (already in its dtypes and device)."""
        for name, folded in self.pending.items():
            layer = self.modules[name]
            bias_like = layer.weight if layer.bias is None else layer.bias
            layer.weight = nn.Parameter(folded.weight, requires_grad=layer.weight.requires_grad)
            layer.bias = nn.Parameter(folded.bias, requires_grad=bias_like.requires_grad)

    # -- checks -----------------------------------------------------------------------------

    def _bn_problem(self, name: str, bn: nn.Module) -> Problem | None:
        if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
            return "bn_unsupported", "is a lazy module that was never run"
        if None in running_statistics(bn):
            return "no_running_stats", (
                "has no running statistics (track_running_stats=False): it always normalizes "
                "with the batch's own mean and variance"
            )
        if is_batchnorm(bn) and bn.training:
            return "training", (
                "is in training mode: its output depends on the batch; call model.eval() "
                "before fold (the folded model represents eval behaviour)"
            )
        if not known_norm_forward(bn):
            return "bn_unsupported", (
                f"{type(bn).__name__} overrides forward: fold cannot tell what it computes"
            )
        return self._shared_problem("bn_unsupported", name, bn)

    def _layer_problem(self, name: str, layer: nn.Module) -> Problem | None:
        """Why this conv/linear cannot take a BN in: ``(code, "which ...")`` or None."""
        code = "layer_unsupported"
        overridden = layer_computation_problem(layer)
        if overridden is not None:
            return code, (
                f"which overrides {overridden}: its output is not torch's computation with "
                "its stored weight"
            )
        if parametrize.is_parametrized(layer):
            return code, "which has a parametrized weight"
        if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            return code, "which is a lazy module that was never run"
        problem = self._shared_problem(code, name, layer)
        return None if problem is None else (code, f"which {problem[1]}")

    def _identities_problem(self, identities: list[fx.Node]) -> Problem | None:
        """An ``nn.Identity`` between the layer and the sum whose hooks would be lost with
        the sum: ``(code, "which reaches the sum through ...")`` or None."""
        for identity in identities:
            hooks = hooks_of(self.modules[str(identity.target)])
            if hooks is not None:
                return "layer_unsupported", (
                    f"which reaches the sum through {self._describe(identity)}, which has {hooks}"
                )
        return None

    def _shared_problem(self, code: str, name: str, module: nn.Module) -> Problem | None:
        """Hooks (forward or backward), several calls or direct reads would see the folded
        weights, or a gone BN, too."""
        hooks = hooks_of(module)
        if hooks is not None:
            return code, f"has {hooks}"
        calls = self.calls[id(module)]
        if calls != 1:
            return code, f"is called {calls} times in forward"
        if any(t == name or t.startswith(name + ".") for t in self.attributes_read):
            return code, "has parameters or buffers read directly in forward"
        return None

    def _axis_problem(
        self, between: fx.Node, layer_name: str, layer: nn.Module, bn: nn.Module
    ) -> Problem | None:
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
        if norm_rank(bn) == rank:
            return None
        return "needs_example_inputs", (
            f"but {meaning}; pass example_inputs to fold so that it can check the shape"
        )

    # -- graph helpers ----------------------------------------------------------------------

    def _is_call_of(
        self, node: fx.Node | None, kind: tuple[type, ...] | Callable[[nn.Module], bool]
    ) -> bool:
        """``node`` calls a module of the types ``kind`` (or for which ``kind`` is true)."""
        if node is None or node.op != "call_module":
            return False
        module = self.modules.get(str(node.target))
        if isinstance(kind, tuple):
            return isinstance(module, kind)
        return module is not None and kind(module)

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


def _before_problem(layer: nn.Module) -> Problem | None:
    """Why ``layer(BN(x))`` is not one layer even though both could fold: ``(code, "which ...")``.

    Exact iff every output sums a fixed set of real (unpadded) inputs: zero padding is added
    AFTER the BN and BN(0) = shift != 0; reflect/replicate/circular padding copies BN outputs,
    which commutes with a per-channel affine map.
    """
    if weight_layout(layer)[0]:
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


def _bn_arguments(bn: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    """``(running_mean, running_var, eps, gamma, beta)`` of a BN, as :func:`fold_weights`
    takes them (``gamma``/``beta`` None for ``affine=False``)."""
    mean, var = running_statistics(bn)
    return mean, var, bn.eps, getattr(bn, "weight", None), getattr(bn, "bias", None)


__all__ = ["LAYERS", "GraphFolder"]
