"""Tracing a model for :func:`bnstats.torch.fold.fold`: which layer feeds which BN.

torch.fx symbolic tracing is used because it needs no inputs, keeps every BN, conv and linear
as one ``call_module`` node under its qualified name (what the report names) and returns an
ordinary ``nn.Module`` with the original's parameter names. ``torch.export`` would need
example inputs, lower BN to ATen ops with lifted parameters and return an ExportedProgram,
losing the module structure that the folded model and the report are expressed in.
Shapes, when wanted, come from torch.fx's ShapeProp on caller-given example inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from bnstats.torch.fold._kinds import hooks_of

Tensor = torch.Tensor


class FoldTraceError(TypeError):
    """fold cannot work on the model as a whole: torch.fx cannot trace it (so its BN layers
    cannot be located), the folded module would not run a hook registered on it (on the
    model, a wrapper, or a submodule that tracing goes through), or the model is itself one
    BN layer (with no neighbouring layer to fold into)."""


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, also keeping every module for which ``is_leaf`` is true as a single
    ``call_module`` node.

    ``is_leaf`` has a default because a saved GraphModule re-creates its tracer class without
    arguments when ``torch.load`` rebuilds it."""

    def __init__(self, is_leaf: Callable[[nn.Module], bool] | None = None) -> None:
        super().__init__()
        self.is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.is_leaf is not None and self.is_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """A leaf becomes one node, called (with its hooks) by the traced module; any other
        module is traced through, and its hooks would run once here, on proxies, and never
        again: refused."""
        hooks = hooks_of(m)
        if hooks is not None:
            name = self.path_of_module(m)
            if not self.is_leaf_module(m, name):
                raise _HookedSubmodule(name, type(m).__name__, hooks)
        return super().call_module(m, forward, args, kwargs)


class _HookedSubmodule(Exception):
    """A module that tracing goes through has hooks (``name``, class name, which hooks)."""


def trace(work: nn.Module, name: str, is_leaf: Callable[[nn.Module], bool]) -> fx.GraphModule:
    """``work`` as an ``fx.GraphModule`` (sharing its submodules) with the same qualified names
    and training flags, every module for which ``is_leaf`` is true kept as one node;
    :class:`FoldTraceError` naming ``name`` if it cannot be traced, or naming the submodule
    if tracing would go through one with hooks (they would not run in the traced module)."""
    tracer = _LeafTracer(is_leaf)
    try:
        graph = tracer.trace(work)
    except _HookedSubmodule as exc:
        path, cls, hooks = exc.args
        raise FoldTraceError(
            f"fold: cannot fold {name}: its submodule {path!r} ({cls}) has {hooks}. "
            f"torch.fx traces through {path!r} (it is not one layer), so they would run once "
            "while tracing and never in the folded module: its output, side effects or "
            f"gradients would silently differ. Remove the hooks from {path!r} before fold "
            "(a hook on a layer the folded module calls, such as torch's own modules, runs "
            "there as before)."
        ) from None
    except Exception as exc:  # any failure of symbolic tracing means: cannot locate the BNs
        raise FoldTraceError(
            f"fold: cannot trace {name} with torch.fx symbolic tracing "
            f"({type(exc).__name__}: {exc}). fold needs the graph to know which layer feeds "
            f"which BN. Remove data-dependent control flow from {name}.forward (or mark such "
            "code with torch.fx.wrap), or fold its traceable submodules one by one."
        ) from exc
    _drop_string_annotations(graph)
    gm = fx.GraphModule(tracer.root, graph, name)
    originals = dict(work.named_modules())
    for qualified, module in gm.named_modules():
        if qualified in originals:  # containers rebuilt by GraphModule default to training
            module.training = originals[qualified].training
    return gm


def refuse_outer_hooks(chain: list[nn.Module]) -> None:
    """:class:`FoldTraceError` if the model (``chain[-1]``) or a wrapper around it has hooks:
    the folded module is a new ``fx.GraphModule``, which would not run them."""
    name = type(chain[-1]).__name__
    for module in chain:
        hooks = hooks_of(module)
        if hooks is None:
            continue
        is_model = module is chain[-1]
        where = "the model itself" if is_model else f"its wrapper {type(module).__name__}"
        raise FoldTraceError(
            f"fold: cannot fold {name}: {where} has {hooks}, which the folded module (a new "
            "torch.fx GraphModule) would not run: its output or gradients would silently "
            f"differ. Remove them from the {'model' if is_model else 'wrapper'} before fold, "
            "and register them on the folded module if it needs them."
        )


def _drop_string_annotations(graph: fx.Graph) -> None:
    """Forget type annotations that are strings (a model module with
    ``from __future__ import annotations``): torch.fx would keep them as string globals of
    the generated code, and ``torch.save`` of the folded module would then fail."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def record_shapes(gm: fx.GraphModule, example_inputs: object, name: str) -> None:
    """Run ``example_inputs`` through ``gm`` in eval mode, storing each node's tensor shape."""
    if isinstance(example_inputs, Tensor):
        inputs: tuple[object, ...] = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        inputs = tuple(example_inputs)
    else:
        raise TypeError(
            f"fold({name}): example_inputs must be a tensor or a tuple of positional "
            f"arguments, got {type(example_inputs).__name__}"
        )
    from torch.fx.passes.shape_prop import ShapeProp  # only needed with example_inputs

    modes = {module: module.training for module in gm.modules()}
    gm.eval()  # no running statistics of the copy change
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
        raise ValueError(
            f"fold({name}): running the model on example_inputs {shapes} failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        for module, training in modes.items():
            module.training = training


__all__ = ["FoldTraceError", "record_shapes", "refuse_outer_hooks", "trace"]
