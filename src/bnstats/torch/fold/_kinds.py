"""Which modules fold: the BN layers whose eval-mode computation fold knows, and the
conv/linear layers whose computation is torch's own.

A BN-like layer folds only if its kind in the registry (:mod:`bnstats.torch.kinds`) says
so: its eval-mode output is ``tail(scale * z + shift)`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``,
``tail`` the kind's child modules (timm's ``drop`` and ``act``) that are not
``nn.Identity``; fold keeps them, in an ``nn.Sequential`` under the BN's name, when the BN
itself is folded away. A subclass that overrides ``forward`` again is not recognised and
stays (``bn_unsupported``).

A conv/linear layer takes a BN in only if both ``forward`` and ``_conv_forward`` are torch's:
a weight-standardised conv (BiT, timm's ``StdConv2d``) computes with a function of its stored
weight, so scaling the stored weight would not scale its output.
"""

from __future__ import annotations

import torch
from torch import nn

from bnstats.torch.kinds import has_fixed_statistics, input_rank, is_batchnorm, kind_of

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
"""The layers that can absorb a BN (and their subclasses that keep torch's computation)."""

_LAYER_METHODS = ("forward", "_conv_forward")

_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hooks"),
    ("_forward_hooks", "forward hooks"),
    ("_backward_pre_hooks", "backward pre-hooks"),
    ("_backward_hooks", "backward hooks"),
)


def is_norm(module: nn.Module) -> bool:
    """A layer fold reports on: any BN layer of torch's family or a frozen BN."""
    return is_batchnorm(module) or has_fixed_statistics(module)


def is_leaf(module: nn.Module) -> bool:
    """What tracing keeps as one node: BN layers, frozen BNs and conv/linear layers."""
    return is_norm(module) or isinstance(module, LAYERS)


def known_norm_forward(module: nn.Module) -> bool:
    """True if fold knows the module's eval-mode output (its kind says ``fold``)."""
    kind = kind_of(module)
    return kind is not None and kind.fold


def tail_names(module: nn.Module) -> tuple[str, ...]:
    """The child modules applied after the affine map, in order (``drop``, ``act``), leaving
    out ``nn.Identity``; empty for layers whose forward is a plain BN."""
    kind = kind_of(module)
    children = module._modules
    return tuple(
        name
        for name in (() if kind is None else kind.tail)
        if isinstance(children.get(name), nn.Module) and not isinstance(children[name], nn.Identity)
    )


def norm_rank(module: nn.Module) -> int | None:
    """The only input rank the layer accepts, if its kind proves one (4 for BatchNorm2d and
    timm's BatchNormAct2d, 5 for BatchNorm3d); None when several ranks pass (BatchNorm1d,
    SyncBatchNorm, frozen BN, which broadcasts)."""
    return input_rank(module)


def running_statistics(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """``(running_mean, running_var)``; None for a BN with ``track_running_stats=False``."""
    return getattr(module, "running_mean", None), getattr(module, "running_var", None)


def hooks_of(module: nn.Module) -> str | None:
    """The hooks registered on ``module`` itself, as words (``"forward hooks and backward
    hooks"``), None if it has none. Forward and backward hooks and pre-hooks count (those
    of ``register_full_backward_hook`` and of the old ``register_backward_hook`` too);
    global module hooks do not: they run on the folded module's layers as well."""
    found = [words for attribute, words in _HOOKS if getattr(module, attribute, None)]
    return " and ".join(found) or None


def layer_computation_problem(layer: nn.Module) -> str | None:
    """Why the layer's output is not torch's ``W * x + b`` with its stored weight: the name
    of the method a subclass overrides (``"Conv2d._conv_forward"``), or None."""
    base = next(cls for cls in LAYERS if isinstance(layer, cls))
    for method in _LAYER_METHODS:
        if getattr(type(layer), method, None) is not getattr(base, method, None):
            return f"{base.__name__}.{method}"
    return None


__all__ = [
    "LAYERS",
    "hooks_of",
    "is_leaf",
    "is_norm",
    "known_norm_forward",
    "layer_computation_problem",
    "norm_rank",
    "running_statistics",
    "tail_names",
]
