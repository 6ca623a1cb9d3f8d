"""Which modules fold: the BN layers whose eval-mode computation fold knows, and the
conv/linear layers whose computation is torch's own.

A BN-like layer folds only if its eval-mode output is known to be
``tail(scale * z + shift)`` with ``scale = gamma / sqrt(running_var + eps)`` and
``shift = beta - running_mean * scale``. That holds when the class that defines its
``forward`` is one of:

- torch's ``_BatchNorm`` or ``nn.SyncBatchNorm`` (torch's own layers and every subclass that
  keeps their forward); ``tail`` is nothing;
- one of bnstats' BN modules (``bt.BatchNorm2d``, ``BatchRenorm2d``, ``GhostBatchNorm2d``,
  ...): in eval mode each normalizes with its running statistics exactly as torch's BN does;
- timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` (BN, then the child modules ``drop`` and
  ``act``), torchvision's and timm's ``FrozenBatchNorm2d`` (statistics and affine parameters
  in buffers) and timm's ``FrozenBatchNormAct2d`` (the same, then ``drop`` and ``act``),
  recognised by class name because bnstats does not import those libraries. ``tail`` is
  their ``drop`` and ``act`` children that are not ``nn.Identity``; fold keeps them, in an
  ``nn.Sequential`` under the BN's name, when the BN itself is folded away.

A subclass that overrides ``forward`` again is not recognised and stays (``bn_unsupported``).

A conv/linear layer takes a BN in only if both ``forward`` and ``_conv_forward`` are torch's:
a weight-standardised conv (BiT, timm's ``StdConv2d``) computes with a function of its stored
weight, so scaling the stored weight would not scale its output.
"""

from __future__ import annotations

import torch
from torch import nn

from bnstats.torch._layers import has_fixed_statistics, is_batchnorm

_BatchNorm = nn.modules.batchnorm._BatchNorm
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

_TORCH_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct")  # BN, then drop and act (timm)
_FROZEN = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")  # fixed BN, then drop and act
_TAIL_NAMES = ("drop", "act")
_LAYER_METHODS = ("forward", "_conv_forward")


def is_norm(module: nn.Module) -> bool:
    """A layer fold reports on: any BN layer of torch's family or a frozen BN."""
    return is_batchnorm(module) or has_fixed_statistics(module)


def is_leaf(module: nn.Module) -> bool:
    """What tracing keeps as one node: BN layers, frozen BNs and conv/linear layers."""
    return is_norm(module) or isinstance(module, LAYERS)


def forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` the module runs."""
    return next(cls for cls in type(module).__mro__ if "forward" in vars(cls))


def known_norm_forward(module: nn.Module) -> bool:
    """True if fold knows the module's eval-mode output (see the module docstring)."""
    owner = forward_owner(module)
    if is_batchnorm(module):
        return (
            owner.forward in _TORCH_FORWARDS or _from_bnstats(owner) or owner.__name__ in _NORM_ACT
        )
    return has_fixed_statistics(module) and owner.__name__ in _FROZEN


def tail_names(module: nn.Module) -> tuple[str, ...]:
    """The child modules applied after the affine map, in order (``drop``, ``act``), leaving
    out ``nn.Identity``; empty for layers whose forward is a plain BN."""
    if forward_owner(module).__name__ not in (*_NORM_ACT, *_FROZEN):
        return ()
    children = module._modules
    return tuple(
        name
        for name in _TAIL_NAMES
        if isinstance(children.get(name), nn.Module) and not isinstance(children[name], nn.Identity)
    )


def norm_rank(module: nn.Module) -> int | None:
    """The only input rank the layer accepts, if its class proves one (4 for BatchNorm2d and
    timm's BatchNormAct2d, 5 for BatchNorm3d); None when several ranks pass (BatchNorm1d,
    SyncBatchNorm, frozen BN, which broadcasts)."""
    owner = forward_owner(module)
    if owner.__name__ == "BatchNormAct2d":
        return 4  # its forward checks x.ndim == 4 itself
    for cls, rank in ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)):
        if not isinstance(module, cls):
            continue
        if _from_bnstats(owner):  # bnstats' modules check the rank in every mode
            return rank
        torch_check = type(module)._check_input_dim is cls._check_input_dim
        if owner.forward in _TORCH_FORWARDS and torch_check:
            return rank
    return None


def running_statistics(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """``(running_mean, running_var)``; None for a BN with ``track_running_stats=False``."""
    return getattr(module, "running_mean", None), getattr(module, "running_var", None)


def layer_computation_problem(layer: nn.Module) -> str | None:
    """Why the layer's output is not torch's ``W * x + b`` with its stored weight: the name
    of the method a subclass overrides (``"Conv2d._conv_forward"``), or None."""
    base = next(cls for cls in LAYERS if isinstance(layer, cls))
    for method in _LAYER_METHODS:
        if getattr(type(layer), method, None) is not getattr(base, method, None):
            return f"{base.__name__}.{method}"
    return None


def _from_bnstats(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "bnstats"


__all__ = [
    "LAYERS",
    "is_leaf",
    "is_norm",
    "known_norm_forward",
    "layer_computation_problem",
    "norm_rank",
    "running_statistics",
    "tail_names",
]
