"""Which modules are batch-norm layers, what bnstats knows of each kind, what wraps a model.

The one registry every tool asks (recalibrate, audit, adapt, fold, convert, the passes):

- :class:`BatchNormKind`: what one class of BN layer is (how a pass takes its batch moments,
  whether and how it folds, whether its statistics are fixed, its input rank, whether it
  synchronises across ranks, whether a pass may make its training forward's kernel call
  itself);
- :func:`kind_of`, :func:`is_batchnorm`, :func:`has_fixed_statistics`,
  :func:`plain_forward_tail`: the questions;
- :func:`register_batchnorm`: teach bnstats a BN class of your own (or of a library);
- :func:`unwrap`, :func:`register_wrapper`: the model inside ``DataParallel``,
  ``DistributedDataParallel``, ``torch.compile``, averaged models and the like.

Built in: torch's ``_BatchNorm`` family (``nn.BatchNorm1d/2d/3d``, ``nn.LazyBatchNorm*``,
``nn.SyncBatchNorm``), timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` and
``FrozenBatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``; bnstats' own modules declare
their kind in a class attribute ``batchnorm_kind``. Libraries bnstats does not import are
named by dotted path.

How a module's kind is found (:func:`kind_of`): the classes of its MRO are visited from the
module's own class on; the first one that is registered (as a class, or by its dotted name
``module.QualName``: where it is defined as well as its name) or declares ``batchnorm_kind``
gives the kind. A class that defines ``forward`` without being known ends the walk: it
computes something the kinds above it do not describe. Then, failing that:

- any subclass of torch's ``_BatchNorm`` is a BN layer with a forward bnstats does not
  know: moments by the pass's hook (right for any forward), not folded. A class that only
  shares a registered class's name (a project's own ``BatchNormAct2d``, a vendored copy of
  timm's) is one of these: its name says nothing of what its forward computes; register it
  to have it folded;
- a class outside that family whose ``forward`` owner is named ``FrozenBatchNorm*``
  (detectron2's, a project's own copy) has fixed statistics: reported, never recalibrated,
  and not folded (its computation is not known);
- anything else is not a BN layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Moments = Literal["kernel", "hook"]


@dataclass(frozen=True)
class BatchNormKind:
    """What bnstats knows of one class of BN layer.

    - ``moments``: how a pass takes each batch's per-channel moments. ``"kernel"``: the
      layer's training forward calls torch's BN kernel (``F.batch_norm``) once over the whole
      input, with ``self.momentum`` as the update weight of ``running_mean`` and
      ``running_var`` (as ``nn.BatchNorm2d`` does); for a pass the weight becomes 1 and the
      kernel leaves each batch's mean and unbiased variance in the buffers: no second read
      of the activations. ``"hook"``: a forward pre-hook measures the layer's input (right
      for any forward, one more read of the activations).
    - ``fold``: fold knows the layer's eval-mode output,
      ``tail(scale * z + shift)`` with ``scale = weight / sqrt(running_var + eps)`` and
      ``shift = bias - running_mean * scale`` (no ``weight``/``bias``: 1 and 0).
    - ``tail``: the child modules applied after that affine map, in order (timm's
      ``("drop", "act")``); fold keeps those that are not ``nn.Identity``, in an
      ``nn.Sequential`` under the layer's name.
    - ``fixed``: statistics and affine parameters are fixed buffers (a frozen BN): reported
      and folded, never recalibrated, adapted or converted.
    - ``rank``: the only input rank the layer accepts (4 for a 2d layer), or None; lets fold
      prove the channel axis without example inputs. A subclass that overrides
      ``_check_input_dim`` loses it.
    - ``synced``: in training under a torch.distributed process group the layer
      synchronises batch statistics across ranks (``nn.SyncBatchNorm``): its kernel's
      moments would not be this rank's alone.
    - ``plain_forward``: the class's training forward is known to be exactly one call
      ``torch.batch_norm(input, weight, bias, running_mean, running_var, True, momentum,
      eps)`` followed by its ``tail`` modules and nothing else (torch's BatchNorm1d/2d/3d,
      timm's ``BatchNormAct2d``): a train-mode pass makes that call itself, into its own
      storage (:func:`bnstats.torch._recorder.kernel_forward`). Built-in kinds only.
    """

    moments: Moments = "hook"
    fold: bool = False
    tail: tuple[str, ...] = ()
    fixed: bool = False
    rank: int | None = None
    synced: bool = False
    plain_forward: bool = False

    def __post_init__(self) -> None:
        if self.moments not in ("kernel", "hook"):
            raise ValueError(f"moments must be 'kernel' or 'hook', got {self.moments!r}")
        if isinstance(self.tail, str) or not all(
            isinstance(name, str) and name.isidentifier() for name in self.tail
        ):
            raise ValueError(
                f"tail must be a tuple of child module names such as ('drop', 'act'), got "
                f"{self.tail!r}"
            )
        if self.tail and not self.fold:
            raise ValueError("tail only matters to fold: give fold=True with it")
        if self.plain_forward and (self.moments != "kernel" or self.synced):
            raise ValueError("plain_forward is a kernel forward of one process: moments='kernel'")
        if self.fixed and self.moments == "kernel":
            raise ValueError("a layer with fixed statistics is never measured: moments='hook'")
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 2
        ):
            raise ValueError(f"rank must be an input rank of 2 or more, or None, got {self.rank!r}")


_TORCH = BatchNormKind(moments="kernel", fold=True, plain_forward=True)
_SYNCED = replace(_TORCH, plain_forward=False, synced=True)
_TIMM_TAIL = ("drop", "act")
_BY_CLASS: dict[type, BatchNormKind] = {
    _BatchNorm: _TORCH,
    nn.BatchNorm2d: replace(_TORCH, rank=4),
    nn.BatchNorm3d: replace(_TORCH, rank=5),
    nn.SyncBatchNorm: _SYNCED,
}
_BY_NAME: dict[str, BatchNormKind] = {
    "timm.layers.norm_act.BatchNormAct2d": replace(_TORCH, tail=_TIMM_TAIL, rank=4),
    "timm.layers.norm_act.SyncBatchNormAct": replace(_SYNCED, tail=_TIMM_TAIL),
    "timm.layers.norm_act.FrozenBatchNormAct2d": BatchNormKind(
        fold=True, tail=_TIMM_TAIL, fixed=True
    ),
    "torchvision.ops.misc.FrozenBatchNorm2d": BatchNormKind(fold=True, fixed=True),
}
"""Classes of libraries bnstats does not import, by ``module.QualName``."""
_FROZEN_PREFIX = "FrozenBatchNorm"
_FROZEN_BY_NAME = BatchNormKind(fixed=True)
"""Any other ``FrozenBatchNorm*`` class (detectron2's, a project's own copy): fixed statistics,
reported and left alone, not folded (its computation is not known)."""
_UNKNOWN_FORWARD = BatchNormKind()
"""A ``_BatchNorm`` subclass with a forward of its own: measured by the hook, kept by fold."""

_found: dict[type, tuple[type, BatchNormKind] | None] = {}
"""The look-up's answers per class (cleared by every registration)."""


def register_batchnorm(
    cls: type[nn.Module] | str,
    *,
    moments: Moments = "hook",
    fold: bool = False,
    tail: tuple[str, ...] = (),
    fixed: bool = False,
    rank: int | None = None,
    synced: bool = False,
) -> BatchNormKind:
    """Teach bnstats a BN layer class: from then on recalibrate, audit, adapt, fold and
    convert find its instances (and those of its subclasses that keep its ``forward``).

    ``cls``: the class, or its dotted name ``"package.module.ClassName"`` for a library you
    would rather not import. The keywords are :class:`BatchNormKind`'s. The layer must have
    torch's BN attributes: ``num_features``, ``eps``, ``running_mean`` and ``running_var``
    (float buffers of shape (C,)), ``num_batches_tracked`` (or None), optional ``weight`` and
    ``bias``, and ``momentum`` with ``moments="kernel"``. :func:`bnstats.torch.convert`
    leaves such a layer as it is (named in its plan with the reason): bnstats has no
    estimator-driven twin of a forward it did not write.

    Registering a class again replaces its kind. Returns the kind; ``TypeError`` or
    ``ValueError`` for a bad argument, before anything is registered.
    """
    names = tail if isinstance(tail, str) else tuple(tail)  # a lone string is refused
    kind = BatchNormKind(
        moments=moments, fold=fold, tail=names, fixed=fixed, rank=rank, synced=synced
    )
    if isinstance(cls, str):
        if "." not in cls or not all(part.isidentifier() for part in cls.split(".")):
            raise ValueError(f"a dotted class name such as 'package.module.Class', got {cls!r}")
        _BY_NAME[cls] = kind
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        _BY_CLASS[cls] = kind
    else:
        raise TypeError(f"cls must be an nn.Module subclass or a dotted name, got {cls!r}")
    _found.clear()
    return kind


def kind_of(module: nn.Module) -> BatchNormKind | None:
    """The module's :class:`BatchNormKind`, None if it is not a BN layer (see the module
    docstring for how it is found)."""
    found = _lookup(type(module))
    return None if found is None else found[1]


def _lookup(cls: type) -> tuple[type, BatchNormKind] | None:
    """``(the class the kind was found on, the kind)``, or None; answers are kept per class."""
    if cls not in _found:
        _found[cls] = _walk(cls)
    return _found[cls]


def _walk(cls: type) -> tuple[type, BatchNormKind] | None:
    forward_owner = None
    for base in cls.__mro__:
        kind = _registered(base)
        if kind is not None:
            return base, kind
        if "forward" in vars(base):
            forward_owner = base
            break
    if not issubclass(cls, _BatchNorm):
        if forward_owner is not None and forward_owner.__name__.startswith(_FROZEN_PREFIX):
            return forward_owner, _FROZEN_BY_NAME
        return None
    return cls, replace(_UNKNOWN_FORWARD, synced=issubclass(cls, nn.SyncBatchNorm))


def _registered(cls: type) -> BatchNormKind | None:
    kind = _BY_CLASS.get(cls)
    if kind is None:
        kind = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if kind is None:
        kind = vars(cls).get("batchnorm_kind")
    return kind


def plain_forward_tail(module: nn.Module) -> tuple[str, ...] | None:
    """The ``tail`` of a layer whose training forward is its kind's plain one
    (:attr:`BatchNormKind.plain_forward`; not replaced on the instance), None for any other
    module."""
    kind = kind_of(module)
    if kind is None or not kind.plain_forward or "forward" in module.__dict__:
        return None
    return kind.tail


def is_batchnorm(module: nn.Module) -> bool:
    """True for a BN layer that normalizes training batches with their own statistics: torch's
    ``_BatchNorm`` family (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``,
    ``nn.LazyBatchNorm*``, any subclass), bnstats' modules, timm's ``BatchNormAct2d`` and
    ``SyncBatchNormAct``, and every class given to :func:`register_batchnorm` without
    ``fixed``."""
    kind = kind_of(module)
    return kind is not None and not kind.fixed


def has_fixed_statistics(module: nn.Module) -> bool:
    """True for a frozen BN (torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``, classes registered with ``fixed=True``) holding its
    ``running_mean`` and ``running_var`` as buffers: folded and reported, never
    recalibrated."""
    kind = kind_of(module)
    buffers = module.__dict__.get("_buffers", {})
    return (
        kind is not None
        and kind.fixed
        and all(buffers.get(key) is not None for key in ("running_mean", "running_var"))
    )


def synchronises(module: nn.Module) -> bool:
    """True for a BN layer that synchronises batch statistics across torch.distributed ranks
    in training (``nn.SyncBatchNorm`` and its subclasses, timm's ``SyncBatchNormAct``)."""
    kind = kind_of(module)
    return kind is not None and kind.synced


def keeps_running_statistics(module: nn.Module) -> bool:
    """A BN layer (:func:`is_batchnorm`) with running statistics to measure: not built with
    ``track_running_stats=False``, and holding a ``running_mean``."""
    return (
        is_batchnorm(module)
        and bool(getattr(module, "track_running_stats", True))
        and getattr(module, "running_mean", None) is not None
    )


def input_rank(module: nn.Module) -> int | None:
    """The only input rank the layer accepts, by its kind (:attr:`BatchNormKind.rank`); None
    when its class (or a subclass overriding ``_check_input_dim``) does not prove one."""
    found = _lookup(type(module))
    if found is None or found[1].rank is None:
        return None
    declared, kind = found
    for cls in type(module).__mro__:
        if cls is declared:
            return kind.rank
        if "_check_input_dim" in vars(cls):
            return None
    return None


# -- what wraps a model ----------------------------------------------------------------------


_WRAPPER_CLASSES: dict[type, str] = {
    nn.DataParallel: "module",
    nn.parallel.DistributedDataParallel: "module",
}
_WRAPPER_NAMES: dict[str, str] = {
    "torch._dynamo.eval_frame.OptimizedModule": "_orig_mod",
    "torch.optim.swa_utils.AveragedModel": "module",
    "timm.utils.model_ema.ModelEma": "module",
    "timm.utils.model_ema.ModelEmaV2": "module",
    "timm.utils.model_ema.ModelEmaV3": "module",
}
"""Wrappers of libraries (or torch modules) not imported here, by ``module.QualName``; a
class of the same name elsewhere counts too when it holds a module under that attribute."""


def register_wrapper(cls: type[nn.Module] | str, attribute: str = "module") -> None:
    """Teach every tool to look through a wrapper: the wrapped model is the child module
    ``attribute`` of an instance of ``cls`` (a class, or a dotted name as in
    :func:`register_batchnorm`)."""
    if not isinstance(attribute, str) or not attribute.isidentifier():
        raise ValueError(f"attribute must be a child module's name, got {attribute!r}")
    if isinstance(cls, str):
        _WRAPPER_NAMES[cls] = attribute
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        _WRAPPER_CLASSES[cls] = attribute
    else:
        raise TypeError(f"cls must be an nn.Module subclass or a dotted name, got {cls!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside every wrapper the tools look through, nested ones too.

    ``nn.DataParallel`` and ``DistributedDataParallel`` (``.module``: its parameters and
    buffers are the wrapper's own tensors), ``torch.compile``'s ``OptimizedModule``
    (``._orig_mod``: the passes run eagerly, so Dynamo recompiles nothing), the averaged
    models ``torch.optim.swa_utils.AveragedModel`` and timm's ``ModelEma``/``ModelEmaV2``/
    ``ModelEmaV3`` (``.module``, the averaged copy), and those given to
    :func:`register_wrapper`. Layer names are those of the unwrapped model. Any other module
    is returned as it is.
    """
    return wrapper_chain(model)[-1]


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, the module it wraps, and so on down to the model inside every wrapper
    (:func:`unwrap`); ``[model]`` for a model that is not wrapped."""
    chain = [model]
    while (inner := _wrapped(chain[-1])) is not None:
        chain.append(inner)
    return chain


def _wrapped(model: nn.Module) -> nn.Module | None:
    attribute = _wrapper_attribute(type(model))
    if attribute is None:
        return None
    inner = model.__dict__.get("_modules", {}).get(attribute)
    return inner if isinstance(inner, nn.Module) else None


def _wrapper_attribute(cls: type) -> str | None:
    for base in cls.__mro__:
        if base in _WRAPPER_CLASSES:
            return _WRAPPER_CLASSES[base]
        path = f"{base.__module__}.{base.__qualname__}"
        if path in _WRAPPER_NAMES:
            return _WRAPPER_NAMES[path]
    names = {name.rsplit(".", 1)[1]: attribute for name, attribute in _WRAPPER_NAMES.items()}
    return names.get(cls.__name__)


__all__ = [
    "BatchNormKind",
    "has_fixed_statistics",
    "input_rank",
    "is_batchnorm",
    "keeps_running_statistics",
    "kind_of",
    "register_batchnorm",
    "register_wrapper",
    "synchronises",
    "unwrap",
    "wrapper_chain",
]
