"""BatchNorm1d/2d/3d whose running statistics follow a pluggable bnstats estimator.

Training normalizes with the batch's own ``mu`` and biased ``var`` (Ioffe & Szegedy 2015),
exactly as torch's layers do; what the estimator decides is how ``running_mean`` and
``running_var`` follow the batches. Every running-average estimator (:class:`bnstats.EMA`,
with or without ``debias``, and :class:`bnstats.CumulativeAverage`) updates, at batch
``t = num_batches_tracked + 1``::

    running_mean = (1 - w_t) * running_mean + w_t * mean
    running_var  = (1 - w_t) * running_var  + w_t * var * count / (count - 1)

with its own weight ``w_t = estimator.weight(t)``: ``momentum`` for the EMA, ``1 / t`` for
the cumulative average, ``momentum / (1 - (1 - momentum)**t)`` for the bias-corrected EMA.
That is torch's update with ``momentum = w_t``, so the fused kernel (``F.batch_norm``)
updates the buffers from its own batch statistics, with no second pass over the data; and
``running_mean``, ``running_var`` and ``num_batches_tracked`` describe the state entirely,
so the state dict is torch's, key for key.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnstats.stats import EMA, CumulativeAverage, NonFiniteStatisticsError, RunningAverage
from bnstats.torch._layers import is_lazy_uninitialized

_UNSET: Any = object()
_STATISTICS = ("running_mean", "running_var")
_NARROW_DTYPES = (torch.float16, torch.bfloat16)

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


def check_estimator(estimator: Any) -> RunningAverage:
    """``estimator`` if a module can keep it in its buffers, else ``TypeError``."""
    if not isinstance(estimator, RunningAverage):
        raise TypeError(
            "the estimator of a BN module must be a running average (bnstats.EMA or "
            f"bnstats.CumulativeAverage), got {type(estimator).__name__}; for exact population "
            "statistics use bnstats.torch.recalibrate on the trained model"
        )
    return estimator


def _estimator_from(momentum: Any, estimator: RunningAverage | None) -> RunningAverage:
    if estimator is not None:
        if momentum is not _UNSET:
            raise ValueError("give momentum or estimator, not both")
        return check_estimator(estimator)
    if momentum is _UNSET:
        return EMA(0.1)
    return CumulativeAverage() if momentum is None else EMA(momentum)


class _EstimatorBatchNorm:
    """The shared body of :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`."""

    _dims: tuple[int, ...] = ()
    _layout = ""
    estimator: RunningAverage
    _moments_from_kernel = False
    """Set on a layer while bnstats' own one-pass tools (recalibrate, audit, adapt) read each
    batch's moments from its buffers: the update weight is 1 and the non-finite check is left
    to the tool (see :mod:`bnstats.torch._moments`)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = _UNSET,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        estimator: RunningAverage | None = None,
    ) -> None:
        chosen = _estimator_from(momentum, estimator)
        extra = {} if bias else {"bias": False}  # older torch has no bias argument
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, 0.1, affine, track_running_stats, device, dtype, **extra
        )
        self.estimator = chosen
        self.qualified_name: str | None = None

    # -- momentum, as torch's tools (update_bn, fvcore) read and set it ----------------------
    @property
    def momentum(self) -> float | None:
        """The estimator as torch's ``momentum``: the EMA's momentum, None when cumulative.

        Setting it chooses the estimator as torch would read the value: ``None`` a
        :class:`~bnstats.CumulativeAverage`, a number an :class:`~bnstats.EMA` with that
        momentum (keeping ``debias`` and ``nonfinite`` of the last EMA).
        """
        estimator = self.__dict__.get("estimator")
        return estimator.momentum if isinstance(estimator, EMA) else None

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        estimator = self.__dict__.get("estimator")
        if estimator is None:  # torch's __init__ sets momentum before the estimator exists
            return
        template = self.__dict__.get("_last_ema", EMA(0.1))
        if value is None:
            self.estimator = CumulativeAverage(nonfinite=estimator.nonfinite)
        else:
            self.estimator = EMA(value, debias=template.debias, nonfinite=estimator.nonfinite)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "estimator":
            check_estimator(value)
            if isinstance(value, EMA):
                self.__dict__["_last_ema"] = value
        super().__setattr__(name, value)  # type: ignore[misc]

    # -- forward ------------------------------------------------------------------------------
    def _label(self) -> str:
        name = f" {self.qualified_name!r}" if self.qualified_name else ""
        return f"{type(self).__name__}({self.num_features}){name}"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        shape = tuple(input.shape)
        if input.dim() not in self._dims or shape[1] != self.num_features:
            expected = self._layout.replace("C", str(self.num_features))
            raise ValueError(f"{self._label()}: expected input of shape {expected}, got {shape}")

    def _update_weight(self) -> float:
        """``w_t`` for the batch about to be merged, ``t = num_batches_tracked + 1``."""
        estimator = self.estimator
        if isinstance(estimator, EMA) and not estimator.debias:
            return estimator.momentum  # constant: no need to read t (a device sync)
        return float(estimator.weight(int(self.num_batches_tracked) + 1))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``z_tilde = weight * (z - mu) / sqrt(var + eps) + bias``: the batch's ``mu``, ``var``
        in training (then the running buffers are updated with ``w_t``), the running ones in
        eval mode."""
        self._check_input_dim(input)
        updating = self.training and self.track_running_stats
        w_t, before = 0.0, None
        if updating and self._moments_from_kernel:
            w_t = 1.0
            self.num_batches_tracked.add_(1)
        elif updating:
            w_t = self._update_weight()
            before = (self.running_mean.clone(), self.running_var.clone())
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        weight, bias = self._affine_like_statistics()
        output = F.batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            weight,
            bias,
            use_batch_stats,
            w_t,
            self.eps,
        )
        if before is not None:
            self._guard_nonfinite(before, tuple(input.shape))
        return output

    def _guard_nonfinite(self, before: tuple[torch.Tensor, torch.Tensor], shape: tuple) -> None:
        """Undo an update that made the running statistics NaN or Inf (pytorch#90342), then
        raise or skip as ``estimator.nonfinite`` says."""
        if bool(torch.isfinite(self.running_mean).all() & torch.isfinite(self.running_var).all()):
            return
        with torch.no_grad():
            self.running_mean.copy_(before[0])
            self.running_var.copy_(before[1])
            self.num_batches_tracked.sub_(1)
        self.estimator.num_batches_skipped += 1
        if self.estimator.nonfinite == "raise":
            raise NonFiniteStatisticsError(
                f"{self._label()}: a batch of shape {shape} brought NaN or Inf statistics; the "
                "running statistics were left unchanged (estimator nonfinite='skip' ignores "
                "such batches)"
            )

    # -- float16 / bfloat16: statistics stay in float32 -----------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.half()``, ``.bfloat16()``, ``.to(dtype)`` and the like, except that
        ``running_mean`` and ``running_var`` never become float16 or bfloat16: they are kept
        in float32 (moved to the new device), taken from the values before the cast, so a
        running_var above 65504 (float16's largest) never turns into inf (pytorch#126525)."""
        before = {key: self._buffers.get(key) for key in _STATISTICS}
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for key, old in before.items():
            new = self._buffers.get(key)
            if old is not None and new is not None and new.dtype in _NARROW_DTYPES:
                self._buffers[key] = old.detach().to(device=new.device, dtype=torch.float32)
        return result

    def _affine_like_statistics(self) -> tuple[Any, Any]:
        """``weight`` and ``bias`` in the running statistics' dtype: torch's CPU kernel takes
        float16 input with float32 statistics only if the affine parameters are float32 too."""
        weight, bias = self.weight, self.bias
        stats = self.running_mean
        if stats is None or weight is None or weight.dtype == stats.dtype:
            return weight, bias
        return weight.to(stats.dtype), None if bias is None else bias.to(stats.dtype)

    def extra_repr(self) -> str:
        estimator = self.estimator
        config = ", ".join(f"{k}={getattr(estimator, k)!r}" for k in estimator._config_keys)
        return (
            f"{self.num_features}, eps={self.eps}, "
            f"estimator={type(estimator).__name__}({config}), "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_EstimatorBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (input (N, C) or (N, C, L)) with a pluggable running estimator.

    Same arguments as torch's, plus ``estimator=`` (default ``EMA(0.1)``, torch's update);
    ``momentum=m`` is ``EMA(m)``, ``momentum=None`` :class:`~bnstats.CumulativeAverage`.
    """

    _dims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_EstimatorBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (input (N, C, H, W)) with a pluggable running estimator.

    Same arguments as torch's, plus ``estimator=`` (default ``EMA(0.1)``, torch's update);
    ``momentum=m`` is ``EMA(m)``, ``momentum=None`` :class:`~bnstats.CumulativeAverage`.
    """

    _dims = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_EstimatorBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (input (N, C, D, H, W)) with a pluggable running estimator.

    Same arguments as torch's, plus ``estimator=`` (default ``EMA(0.1)``, torch's update);
    ``momentum=m`` is ``EMA(m)``, ``momentum=None`` :class:`~bnstats.CumulativeAverage`.
    """

    _dims = (5,)
    _layout = "(N, C, D, H, W)"


_REPLACEMENTS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert(model: nn.Module, estimator: RunningAverage) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` in ``model`` for bnstats' module with ``estimator``.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the model is changed in place and
    returned (a new module if ``model`` itself is a BN layer). Each new layer takes over the
    old one's ``Parameter`` and buffer tensors (so an optimizer built before still holds the
    right parameters), its training flag and its hooks, and gets its own deep copy of
    ``estimator``. bnstats layers already there get a copy of ``estimator`` too. A layer
    registered under several names stays one shared layer. ``nn.SyncBatchNorm`` and other
    subclasses of torch's BN are left as they are; an uninitialized ``LazyBatchNorm*``
    raises ``ValueError`` (run one forward first).
    """
    check_estimator(estimator)
    return _convert(model, estimator, "", {})


def _convert(
    module: nn.Module, estimator: RunningAverage, name: str, done: dict[int, nn.Module]
) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    if isinstance(module, _EstimatorBatchNorm):
        module.estimator = copy.deepcopy(estimator)
        module.qualified_name = name or None
        new = module
    elif type(module) in _REPLACEMENTS:
        new = _replacement(module, _REPLACEMENTS[type(module)], estimator, name)
    else:
        if is_lazy_uninitialized(module) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"BN layer {name or '<model>'!r} is an uninitialized {type(module).__name__}; "
                "run one forward so that its shapes are known, then convert"
            )
        for child_name, child in list(module.named_children()):
            converted = _convert(
                child, estimator, f"{name}.{child_name}" if name else child_name, done
            )
            if converted is not child:
                module.add_module(child_name, converted)
        new = module
    done[id(module)] = new
    return new


def _replacement(
    old: nn.modules.batchnorm._BatchNorm, cls: type, estimator: RunningAverage, name: str
) -> nn.Module:
    new = cls(
        old.num_features,
        old.eps,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",
        estimator=copy.deepcopy(estimator),
        **({} if old.bias is not None or not old.affine else {"bias": False}),
    )
    for key in ("weight", "bias"):
        setattr(new, key, getattr(old, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(key, getattr(old, key))
    new.training = old.training
    new.qualified_name = name or None
    for attribute in _HOOK_DICTS:
        if hasattr(old, attribute):
            setattr(new, attribute, getattr(old, attribute))
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new
