"""Swap torch's BN layers for bnstats' estimator-driven ones: :func:`convert`.

Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the model is changed in place and returned.
Each new layer takes over the old one's ``Parameter`` and buffer tensors (an optimizer built
before still holds the right parameters), its training flag and its hooks. The walk first
plans every replacement and checks every layer, then applies them all: on any error, also a
``KeyboardInterrupt`` while applying, the model is left as it was.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bnstats.stats import EMA, RunningAverage
from bnstats.torch._layers import (
    display_name,
    is_batchnorm,
    is_lazy_uninitialized,
    registered_children,
    uninitialized_lazy_error,
)
from bnstats.torch.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    EstimatorBatchNorm,
    EstimatorMomentum,
    check_estimator,
    estimator_for_momentum,
)

_REPLACEMENTS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class ConversionPlan:
    """What :func:`convert` does: ``replaced`` torch layers (by qualified name), bnstats
    layers that get the estimator (``retuned``: BatchNorm, BatchRenorm, GhostBatchNorm), and
    BN layers ``left`` as they are with the reason (subclasses it does not know, such as
    ``nn.SyncBatchNorm`` or timm's ``BatchNormAct2d``, whose own forward it would lose)."""

    root: nn.Module | None = None
    replaced: list[str] = field(default_factory=list)
    retuned: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    _steps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list, repr=False)
    _estimators: list[tuple[nn.Module, RunningAverage, str | None]] = field(
        default_factory=list, repr=False
    )


def convert(
    model: nn.Module, estimator: RunningAverage, *, keep_momentum: bool = False
) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` in ``model`` for bnstats' module with ``estimator``.

    Each converted layer gets its own deep copy of ``estimator``; bnstats' layers already
    there (BatchNorm, BatchRenorm, GhostBatchNorm: they keep their ghost or renorm
    behaviour) get one too. ``keep_momentum=True``: each layer keeps its own momentum (an
    ``EMA`` estimator takes the layer's momentum, so mnasnet's 0.0003 stays 0.0003; a layer
    with ``momentum=None`` keeps the cumulative average and one with ``momentum=0.0`` its
    statistics that never move, whatever the estimator, and a bnstats layer with a schedule
    of its own keeps it), the estimator giving the rest (``debias``, ``nonfinite``). A layer
    registered under several names (also twice in one parent: ``self.norm = self.bn``)
    becomes one new layer under every name. Other BN subclasses are left as they are, named
    in a warning (see :class:`ConversionPlan`); the plan is also returned by
    :func:`plan_conversion`.

    Raises ``TypeError`` for an estimator that is not a running average and ``ValueError``
    for an uninitialized ``LazyBatchNorm*`` (run one forward first), before changing
    anything; the model is returned (a new module if ``model`` itself is a BN layer).
    """
    plan = plan_conversion(model, estimator, keep_momentum=keep_momentum)
    converted = _apply(plan)
    if plan.left:
        left = "; ".join(f"{display_name(name)}: {why}" for name, why in plan.left.items())
        warnings.warn(f"bnstats.convert left BN layer(s) as they are: {left}", stacklevel=2)
    return converted


def plan_conversion(
    model: nn.Module, estimator: RunningAverage, *, keep_momentum: bool = False
) -> ConversionPlan:
    """What :func:`convert` would do, with nothing changed; the same errors."""
    check_estimator(estimator)
    plan = ConversionPlan()
    plan.root = _plan(plan, model, "", estimator, keep_momentum, {})
    return plan


def _plan(
    plan: ConversionPlan,
    module: nn.Module,
    name: str,
    estimator: RunningAverage,
    keep_momentum: bool,
    done: dict[int, nn.Module],
) -> nn.Module:
    """The module that will stand where ``module`` stands (planned, nothing changed)."""
    if id(module) in done:
        return done[id(module)]
    new = module
    if isinstance(module, EstimatorBatchNorm):
        own = _estimator_for(module, estimator, keep_momentum)
        plan._estimators.append((module, own, name or None))
        plan.retuned.append(name)
    elif type(module) in _REPLACEMENTS:
        own = _estimator_for(module, estimator, keep_momentum)
        new = _replacement(module, _REPLACEMENTS[type(module)], own, name)
        plan.replaced.append(name)
    elif is_batchnorm(module):
        if is_lazy_uninitialized(module):
            raise ValueError(uninitialized_lazy_error(name, module) + "; then convert")
        plan.left[name] = f"{type(module).__name__} keeps its own forward"
    else:
        for child_name, child in registered_children(module):
            full = f"{name}.{child_name}" if name else child_name
            planned = _plan(plan, child, full, estimator, keep_momentum, done)
            if planned is not child:
                plan._steps.append((module, child_name, planned))
    done[id(module)] = new
    return new


def _estimator_for(module: nn.Module, estimator: RunningAverage, keep_momentum: bool) -> Any:
    own = copy.deepcopy(estimator)
    if not keep_momentum or not is_batchnorm(module):
        return own
    momentum = module.momentum
    names_its_own = momentum is None or momentum == 0 or isinstance(momentum, EstimatorMomentum)
    if isinstance(own, EMA) or names_its_own:
        debias = getattr(own, "debias", False)
        return estimator_for_momentum(momentum, debias=debias, nonfinite=own.nonfinite)
    return own


def _apply(plan: ConversionPlan) -> nn.Module:
    """Apply the planned swaps all at once; undone if anything (a ``KeyboardInterrupt`` too)
    interrupts them."""
    undo: list[Any] = []
    try:
        for layer, estimator, name in plan._estimators:
            undo.append((layer, "_schedule", layer._schedule))
            undo.append((layer, "qualified_name", layer.qualified_name))
            layer.estimator = estimator
            layer.qualified_name = name
        for parent, child_name, new in plan._steps:
            undo.append((parent._modules, child_name, parent._modules[child_name]))
            parent._modules[child_name] = new
    except BaseException:
        for owner, key, value in reversed(undo):
            if isinstance(owner, dict):
                owner[key] = value
            else:
                setattr(owner, key, value)
        raise
    return plan.root


def _replacement(
    old: nn.modules.batchnorm._BatchNorm, cls: type, estimator: RunningAverage, name: str
) -> nn.Module:
    new = cls(
        old.num_features,
        old.eps,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",
        estimator=estimator,
        **({} if old.bias is not None or not old.affine else {"bias": False}),
    )
    for key in ("weight", "bias"):
        setattr(new, key, getattr(old, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(key, getattr(old, key))
    new.sync_counters()
    new.num_batches_skipped = new.num_batches_skipped.new_zeros((), device=_device_of(old))
    new.training = old.training
    new.qualified_name = name or None
    for attribute in _HOOK_DICTS:
        if hasattr(old, attribute):
            setattr(new, attribute, getattr(old, attribute))
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _device_of(module: nn.Module) -> Any:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return tensor.device
    return "cpu"
