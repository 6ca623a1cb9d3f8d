"""BatchNorm1d/2d/3d whose running statistics follow a pluggable bnstats estimator.

Training normalizes with the batch's own ``mu`` and biased ``var`` (Ioffe & Szegedy 2015),
exactly as torch's layers do; what the estimator decides is how ``running_mean`` and
``running_var`` follow the batches. Every running-average estimator (:class:`bnstats.EMA`,
with or without ``debias``, and :class:`bnstats.CumulativeAverage`) updates, at batch
``t = num_batches_tracked + 1``::

    running_mean = (1 - w_t) * running_mean + w_t * mean
    running_var  = (1 - w_t) * running_var  + w_t * var * count / (count - 1)

with its own weight ``w_t = estimator.weight(t)``: ``momentum`` for the EMA, ``1 / t`` for
the cumulative average, ``momentum / (1 - (1 - momentum)**t)`` for the bias-corrected EMA,
whatever a subclass of :class:`bnstats.stats.RunningAverage` says for its own. Eagerly ``t``
is the step as the host counts it; under compilers and tracers it is
``num_batches_tracked + 1`` on the device, and the same method computes ``w_t`` there.
``running_mean``, ``running_var`` and ``num_batches_tracked`` describe the state entirely, so
the state dict is torch's, key for key, and ``module.estimator`` reads its state from them.

Nothing in a training step reads a device value on the host (on a GPU each read stalls the
launch queue): the kernel that normalizes the batch leaves its ``mean`` and unbiased
``var`` in a scratch pair, ``w_t`` is computed on the device from ``num_batches_tracked``,
and an update that would make the statistics NaN or Inf is undone on the device
(``torch.where``; pytorch#88474, #90342) and counted in ``num_batches_skipped``. With
``nonfinite="raise"`` the error surfaces without blocking: on the CPU at once, on a GPU at
the layer's next forward (a flag copied asynchronously). The same code traces with
``torch.fx.symbolic_trace``, ``torch.compile(fullgraph=True)`` and ``torch.export``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnstats.stats import (
    EMA,
    CumulativeAverage,
    FixedStatistics,
    NonFinitePolicy,
    NonFiniteStatisticsError,
    RunningAverage,
)
from bnstats.torch._layers import (
    fewer_than_two_values,
    is_lazy_uninitialized,
    process_group_initialized,
)
from bnstats.torch.kinds import BatchNormKind, kind_of

_UNSET: Any = object()
_STATISTICS = ("running_mean", "running_var")
NARROW_DTYPES = (torch.float16, torch.bfloat16)
"""Half-precision dtypes: torch's CPU kernels return their moments in them (bnstats upcasts)."""
_KERNEL_BUFFER_DTYPES = (torch.float32, torch.float64)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped")


def check_estimator(estimator: Any) -> RunningAverage:
    """``estimator`` if a module can keep it in its buffers, else ``TypeError``."""
    if not isinstance(estimator, RunningAverage):
        raise TypeError(
            "the estimator of a BN module must be a running average (bnstats.EMA or "
            f"bnstats.CumulativeAverage), got {type(estimator).__name__}; for exact population "
            "statistics use bnstats.torch.recalibrate on the trained model"
        )
    return estimator


class EstimatorMomentum(float):
    """A BN module's ``momentum`` when no plain number describes its estimator (a schedule of
    your own, a subclass): the weight ``w_t`` the next batch gets, as torch code reading
    ``momentum`` as a number expects, carrying the estimator itself, so that setting the value
    back restores it (``update_bn``, fvcore's precise BN and Lightning's SWA save
    ``momentum``, set ``None`` or ``1.0``, and set the saved value back)."""

    estimator: RunningAverage

    def __new__(cls, value: float, estimator: RunningAverage) -> EstimatorMomentum:
        momentum = super().__new__(cls, value)
        momentum.estimator = estimator
        return momentum

    def __getnewargs__(self) -> tuple[float, RunningAverage]:  # type: ignore[override]
        return float(self), self.estimator  # copy and pickle with the estimator


def estimator_for_momentum(
    momentum: float | None, *, debias: bool = False, nonfinite: NonFinitePolicy = "raise"
) -> RunningAverage:
    """The estimator torch's ``momentum`` describes: ``None`` the
    :class:`~bnstats.CumulativeAverage`, ``0.0`` :class:`~bnstats.stats.FixedStatistics`
    (statistics that never move), any other number an :class:`~bnstats.EMA` with ``debias``;
    each with ``nonfinite``. An :class:`EstimatorMomentum` gives a copy of the estimator it
    carries (``debias`` and ``nonfinite`` are its own)."""
    if isinstance(momentum, EstimatorMomentum):
        return copy.deepcopy(momentum.estimator)
    if momentum is None:
        return CumulativeAverage(nonfinite=nonfinite)
    if momentum == 0:
        return FixedStatistics(nonfinite=nonfinite)
    return EMA(momentum, debias=debias, nonfinite=nonfinite)


def _estimator_from(momentum: Any, estimator: RunningAverage | None) -> RunningAverage:
    if estimator is not None:
        if momentum is not _UNSET:
            raise ValueError("give momentum or estimator, not both")
        return check_estimator(estimator)
    return EMA(0.1) if momentum is _UNSET else estimator_for_momentum(momentum)


def _same_estimator(one: RunningAverage, other: RunningAverage) -> bool:
    """Same class, same settings (``momentum``, ``debias``, ``nonfinite``...)."""
    return type(one) is type(other) and all(
        getattr(one, key) == getattr(other, key) for key in one._config_keys
    )


def is_tracing(x: Any) -> bool:
    """True under ``torch.fx.symbolic_trace``, ``torch.compile``, ``torch.export`` and
    ``torch.jit.trace``: no Python-side checks of values or shapes then."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        return True
    compiler = torch.compiler
    exporting = getattr(compiler, "is_exporting", lambda: False)
    return bool(compiler.is_compiling() or exporting())


class EstimatorBatchNorm:
    """The shared body of bnstats' BN modules: BatchNorm, BatchRenorm and GhostBatchNorm.

    A subclass changes how a training batch is normalized by overriding
    :meth:`_train_forward`, built from :meth:`_normalize_and_update`; the estimator, the
    non-finite protection and the flag of bnstats' passes (``_pass_weight``) are here.
    """

    _dims: tuple[int, ...] = ()
    _layout = ""
    batchnorm_kind: BatchNormKind
    """What the registry (:mod:`bnstats.torch.kinds`) knows of the class: each concrete
    module declares it. A subclass elsewhere that overrides :meth:`_train_forward` keeps it
    with its moments taken by the pass's hook (its training forward is not the kernel
    call); one that overrides ``forward`` is a BN layer of unknown forward."""
    _pass_weight: float | None = None
    """Set while one of bnstats' passes measures this layer (see
    :func:`bnstats.torch._level.pass_mode`): each batch is normalized with its own statistics,
    which enter the buffers with this weight (1: the pass reads them there; 0: the buffers
    are left alone); nothing is counted or checked."""
    _counts_refused_batches = True
    """torch's training forward counts a batch in ``num_batches_tracked`` before its kernel
    refuses it (one value per channel, wrong channels): the drop-ins do the same. Ghost BN
    (whose count is of virtual batches) and Batch Renorm (whose count is its schedule's
    step) do not."""
    _host_checked_devices: tuple[str, ...] = ("cpu",)
    """Devices whose values the host reads without waiting (the CPU): there the update is
    checked on the host; everywhere else on the device (:meth:`_keep_if_finite`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declaring = next((c for c in cls.__mro__[1:] if "batchnorm_kind" in vars(c)), None)
        if declaring is None or "batchnorm_kind" in vars(cls):
            return
        same_forward = cls.forward is declaring.forward
        if same_forward and cls._train_forward is not declaring._train_forward:
            cls.batchnorm_kind = replace(declaring.batchnorm_kind, moments="hook")

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
        self._schedule = chosen
        self.register_buffer(
            "num_batches_skipped", torch.zeros((), dtype=torch.long, device=device), False
        )
        self.qualified_name: str | None = None
        self._pending: list[tuple[torch.Tensor, Any, tuple[int, ...]]] = []
        self._host_step = 0
        """``num_batches_tracked`` as the host knows it, for ``w_t`` without a device read."""

    # -- the estimator: decides the weights, reads its state from the buffers ----------------
    @property
    def estimator(self) -> RunningAverage:
        """The estimator deciding ``w_t``; its ``mean``, ``var``, ``num_batches_tracked`` and
        ``num_batches_skipped`` are read from this module's buffers when asked for (a host
        read: not for per-step code). A BN module keeps no sample count: ``count`` is 0."""
        schedule = self._schedule
        tracked = self.num_batches_tracked
        mean, var = self.running_mean, self.running_var
        schedule.load_running(
            None if mean is None else mean.detach(),
            None if var is None else var.detach(),
            0 if tracked is None else int(tracked),
            int(self.num_batches_skipped),
        )
        return schedule

    @estimator.setter
    def estimator(self, value: RunningAverage) -> None:
        self._schedule = check_estimator(value)

    @property
    def momentum(self) -> float | None:
        """The estimator as torch's ``momentum``: the EMA's momentum, None when cumulative,
        0.0 for statistics that never move; for any other estimator (a schedule of your own)
        an :class:`EstimatorMomentum`, a float equal to the weight the next batch gets that
        carries the estimator. Whatever it reads, setting it back restores the estimator.

        Setting it chooses the estimator as torch would read the value: ``None`` a
        :class:`~bnstats.CumulativeAverage`, ``0.0`` :class:`~bnstats.stats.FixedStatistics`,
        a number an :class:`~bnstats.EMA` with that momentum (keeping ``debias`` and
        ``nonfinite`` of the last EMA), an :class:`EstimatorMomentum` its estimator.
        """
        schedule = self.__dict__.get("_schedule")
        if schedule is None:
            return None
        plain = getattr(schedule, "momentum", None)
        if _same_estimator(self._estimator_for_momentum(plain), schedule):
            return plain
        weight = schedule.weight(self._host_step + 1) if plain is None else plain
        return EstimatorMomentum(float(weight), schedule)

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        if self.__dict__.get("_schedule") is None:  # torch's __init__ sets momentum first
            return
        self._schedule = self._estimator_for_momentum(value)

    def _estimator_for_momentum(self, value: float | None) -> RunningAverage:
        """The estimator setting ``momentum = value`` chooses."""
        template = self.__dict__.get("_last_ema", EMA(0.1))
        return estimator_for_momentum(
            value, debias=template.debias, nonfinite=self._schedule.nonfinite
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_schedule" and isinstance(value, EMA):
            self.__dict__["_last_ema"] = value
        super().__setattr__(name, value)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        return {**state, "_pending": []}  # a CUDA event does not copy or pickle

    # -- forward ------------------------------------------------------------------------------
    def _label(self) -> str:
        name = f" {self.qualified_name!r}" if self.qualified_name else ""
        return f"{type(self).__name__}({self.num_features}){name}"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """The rank of ``input``, and its channels where a per-channel tensor must match them;
        ``ValueError`` naming the module."""
        self._check_rank(input)
        problem = self._channel_problem(input)
        if problem is not None:
            raise ValueError(problem)

    def _check_rank(self, input: torch.Tensor) -> None:
        if input.dim() not in self._dims:
            ranks = " or ".join(f"{rank}D" for rank in self._dims)
            raise ValueError(
                f"{self._label()}: expected {ranks} input of shape {self._expected_shape()}, "
                f"got {tuple(input.shape)}"
            )

    def _channel_problem(self, input: torch.Tensor) -> str | None:
        """Wrong channels on axis 1, if the kernel gets a per-channel tensor to check them
        against: with none (``affine=False`` and no running statistics used) torch takes
        any number of channels, and so does this module."""
        if input.shape[1] == self.num_features:
            return None
        uses_buffers = not self.training or self.track_running_stats
        buffers = (self.running_mean, self.running_var) if uses_buffers else ()
        if all(tensor is None for tensor in (self.weight, self.bias, *buffers)):
            return None
        return (
            f"{self._label()} expects {self.num_features} channels on axis 1: expected input "
            f"of shape {self._expected_shape()}, got {tuple(input.shape)}"
        )

    def _expected_shape(self) -> str:
        return self._layout.replace("C", str(self.num_features))

    def _check_input(self, input: torch.Tensor, batch_stats: bool) -> None:
        """The rank and channels of ``input`` and, when it is normalized by its own
        statistics, not exactly 1 value per channel; ``ValueError`` naming the module. An
        empty batch passes, as in torch: its output is empty, the statistics stay and the
        batch is counted in ``num_batches_tracked``. A training batch refused for its
        channels or its single values is counted too (:attr:`_counts_refused_batches`)."""
        self._check_rank(input)
        problem = self._channel_problem(input)
        if problem is None and batch_stats and input.numel() // input.shape[1] == 1:
            when = " in training" if self.training else ""
            problem = fewer_than_two_values(self._label(), tuple(input.shape), when)
        if problem is not None:
            self._count_refused_batch()
            raise ValueError(problem)

    def _count_refused_batch(self) -> None:
        """``num_batches_tracked`` (and the host step) one up, as torch's training forward
        counts a batch before its kernel checks it; nothing is read on the host."""
        tracked = self.num_batches_tracked
        counts = self.training and self.track_running_stats and tracked is not None
        if counts and self._counts_refused_batches and self._pass_weight is None:
            tracked.add_(1)  # bnstats' passes (_pass_weight) count nothing
            self._host_step += 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``z_tilde = weight * (z - mu) / sqrt(var + eps) + bias``: the batch's ``mu``, ``var``
        in training (the running buffers then take the batch with weight ``w_t``), the
        running ones in eval mode."""
        no_buffers = self.running_mean is None and self.running_var is None
        batch_stats = self.training or no_buffers
        if not is_tracing(input):
            self._check_input(input, batch_stats)
            self._settle_pending()
        if self.training and self.track_running_stats and not no_buffers:
            return self._train_forward(input)
        tracked = not self.training or self.track_running_stats
        return self._batch_norm(input, tracked, batch_stats, 0.0)

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        """A training batch: normalized by its statistics, which the buffers then take."""
        output, bad = self._normalize_and_update(input)
        self._defer_raise(input, bad)
        return output

    def _batch_norm(
        self, x: torch.Tensor, tracked: bool, batch_stats: bool, weight: float, affine: bool = True
    ) -> torch.Tensor:
        gamma, beta = self._affine_like_statistics() if affine else (None, None)
        return F.batch_norm(
            x,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            gamma,
            beta,
            batch_stats,
            weight,
            self.eps,
        )

    def _normalize_and_update(
        self, x: torch.Tensor, affine: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalize ``x`` with its own statistics and merge them into the buffers with
        ``w_t``; returns the output and the device flag "this batch was NaN/Inf, undone"."""
        if self._pass_weight is not None:
            return self._batch_norm(x, self._pass_weight > 0, True, self._pass_weight, affine), None
        if is_tracing(x):
            return self._traced_update(x, affine)
        # the step is the host's own count: w_t is a Python number, no device value is read
        weight = float(self._schedule.weight(self._host_step + 1))
        self._host_step += 1
        if self.running_mean.device.type in self._host_checked_devices:
            return self._update_checked_on_host(x, affine, weight)
        updated = torch.stack((self.running_mean, self.running_var))  # a copy for the kernel
        gamma, beta = self._affine_like_statistics() if affine else (None, None)
        output = F.batch_norm(x, updated[0], updated[1], gamma, beta, True, weight, self.eps)
        return output, self._keep_if_finite(updated)

    def _update_checked_on_host(
        self, x: torch.Tensor, affine: bool, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """On the CPU, where reading a value stalls nothing: torch's own in-place update, a
        finiteness test read at once, and the buffers put back in the rare bad case (fewer
        small operations than the device-side path, which costs about 10 % of a CPU BN
        call)."""
        before = torch.stack((self.running_mean, self.running_var))
        output = self._batch_norm(x, True, True, weight, affine)
        finite = torch.isfinite(self.running_mean).all() & torch.isfinite(self.running_var).all()
        if finite:  # a CPU tensor: no device to wait for
            self.num_batches_tracked.add_(1)
        else:  # through .data: autograd's saved buffers of earlier forwards stay valid
            self.running_mean.data.copy_(before[0])
            self.running_var.data.copy_(before[1])
            self.num_batches_skipped.add_(1)
        return output, finite.logical_not()

    def _keep_if_finite(self, updated: torch.Tensor, x: Any = None) -> torch.Tensor:
        """Take the ``updated`` (2, C) statistics into the buffers unless they hold NaN or
        Inf, decided on the device; count the batch as tracked or skipped. Returns the flag
        "undone". (The kernel updates a copy: autograd keeps what it saved untouched.)
        ``x``: the input, through which a tracer sees the buffers (:meth:`_traced_buffer`)."""
        mean, var, tracked, skipped = (self._traced_buffer(key, x) for key in _BUFFERS)
        finite = torch.isfinite(updated).all()
        mean.copy_(torch.where(finite, updated[0], mean))
        var.copy_(torch.where(finite, updated[1], var))
        tracked.add_(finite.long())
        bad = finite.logical_not()
        skipped.add_(bad.long())
        return bad

    def _traced_update(
        self, x: torch.Tensor, affine: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same update for compilers and tracers: the kernel leaves the batch's ``mean``
        and unbiased ``var`` in a scratch pair, merged as the kernel would with
        ``w_t = estimator.weight(t)`` for ``t = num_batches_tracked + 1`` held on the device
        (equal to the eager update to float rounding). An empty batch changes nothing
        (``w_t`` times "the batch has values"), and counts, as in torch."""
        mean, var, tracked, _ = (self._traced_buffer(key, x) for key in _BUFFERS)
        running = torch.stack((mean, var))
        batch = torch.zeros_like(running)  # the kernel writes 0 * 0 + 1 * (mean, var)
        gamma, beta = self._affine_like_statistics() if affine else (None, None)
        output = F.batch_norm(x, batch[0], batch[1], gamma, beta, True, 1.0, self.eps)
        step = (tracked + 1).to(torch.float64)
        weight = torch.ones_like(step) * self._schedule.weight(step)  # a number or a tensor
        weight = (weight * (x.numel() > 0)).to(self.running_mean.dtype)
        self._keep_if_finite(batch * weight + running * (1 - weight), x)
        return output, None

    def _traced_buffer(self, key: str, x: Any) -> Any:
        """Buffer ``key``, as a graph node under ``torch.fx.symbolic_trace`` (whose default
        tracer would otherwise bake the buffer in as a constant and drop its update)."""
        if not isinstance(x, torch.fx.Proxy):
            return getattr(self, key)
        path = x.tracer.path_of_module(self)
        return x.tracer.create_proxy("get_attr", f"{path}.{key}" if path else key, (), {})

    # -- non-finite batches: never a blocking read ------------------------------------------
    def _defer_raise(self, input: torch.Tensor, bad: torch.Tensor | None) -> None:
        """Hand the "undone" flag over to the host without blocking, when the host needs it:
        under ``nonfinite="raise"``, or to keep the host step in step with
        ``num_batches_tracked`` for a weight that depends on it. On the CPU it is read at
        once; on a GPU it is copied asynchronously and read at this layer's next forward
        (:meth:`_settle_pending`)."""
        if bad is None:
            return
        schedule = self._schedule
        if schedule.nonfinite != "raise" and not schedule.weight_depends_on_step:
            return
        shape = tuple(input.shape)
        if bad.device.type == "cpu":
            self._pending.append((bad, None, shape))
            self._settle_pending()
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((flag, event, shape))

    def _settle_pending(self) -> None:
        """Take in a batch flagged NaN/Inf (its update was already undone on the device): the
        host step goes back one, and under ``nonfinite="raise"``
        :class:`NonFiniteStatisticsError` names the layer. Never waits: a flag whose copy
        an event query does not report done yet stays for a later forward (on a GPU the
        previous step's is normally done by the next)."""
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            flag, _, shape = self._pending.pop(0)
            if flag:
                self._take_bad_batch(shape)

    def _take_bad_batch(self, shape: tuple[int, ...]) -> None:
        self._host_step -= 1
        if self._schedule.nonfinite == "raise":
            raise NonFiniteStatisticsError(
                f"{self._label()}: a batch of shape {shape} brought NaN or Inf statistics; the "
                "running statistics were left unchanged (estimator nonfinite='skip' ignores "
                "such batches)"
            )

    def sync_counters(self) -> None:
        """Re-read ``num_batches_tracked`` into the host step after the buffers were written
        from outside (bnstats' tools and ``load_state_dict`` do this themselves; needed after
        writing the buffer by hand, or before eager steps that follow compiled ones with a
        debiased EMA or the cumulative average). A host read: not for per-step code."""
        self._pending = []
        tracked = self.num_batches_tracked
        self._host_step = 0 if tracked is None else int(tracked)

    def reset_running_stats(self) -> None:
        """torch's reset (0, 1, 0), the host step and ``num_batches_skipped`` with it (as
        ``update_bn`` calls it before averaging)."""
        super().reset_running_stats()  # type: ignore[misc]
        if "num_batches_skipped" in self._buffers:
            self.num_batches_skipped.zero_()
        self._host_step = 0
        self._pending = []

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """torch's load, then the statistics in float32 if ``assign=True`` brought float16 or
        bfloat16 tensors in place of the buffers, and the host step re-read."""
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
        for key in _STATISTICS:
            value = self._buffers.get(key)
            if value is not None and value.dtype in NARROW_DTYPES:
                self._buffers[key] = value.detach().to(torch.float32)
        self.sync_counters()

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
            if old is not None and new is not None and new.dtype in NARROW_DTYPES:
                self._buffers[key] = old.detach().to(device=new.device, dtype=torch.float32)
        return result

    def _affine_like_statistics(self) -> tuple[Any, Any]:
        """``weight`` and ``bias`` in the running statistics' dtype: torch's CPU kernel takes
        float16 input with float32 statistics only if the affine parameters are float32 too.
        (Dtypes are read from the tensors themselves, which tracers leave unproxied.)"""
        weight, stats = self._parameters.get("weight"), self._buffers.get("running_mean")
        if stats is None or weight is None or weight.dtype == stats.dtype:
            return self.weight, self.bias
        bias = self.bias
        return self.weight.to(stats.dtype), None if bias is None else bias.to(stats.dtype)

    def extra_repr(self) -> str:
        schedule = self._schedule
        config = ", ".join(f"{k}={getattr(schedule, k)!r}" for k in schedule._config_keys)
        return (
            f"{self.num_features}, eps={self.eps}, "
            f"estimator={type(schedule).__name__}({config}), "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(EstimatorBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (input (N, C) or (N, C, L)) with a pluggable running estimator.

    Same arguments as torch's, plus ``estimator=`` (default ``EMA(0.1)``, torch's update);
    ``momentum=m`` is ``EMA(m)``, ``momentum=None`` :class:`~bnstats.CumulativeAverage`.
    """

    _dims = (2, 3)
    _layout = "(N, C) or (N, C, L)"
    batchnorm_kind = BatchNormKind(moments="kernel", fold=True)


class BatchNorm2d(EstimatorBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (input (N, C, H, W)) with a pluggable running estimator.

    Same arguments as torch's, plus ``estimator=`` (default ``EMA(0.1)``, torch's update);
    ``momentum=m`` is ``EMA(m)``, ``momentum=None`` :class:`~bnstats.CumulativeAverage`.
    """

    _dims = (4,)
    _layout = "(N, C, H, W)"
    batchnorm_kind = BatchNormKind(moments="kernel", fold=True, rank=4)


class BatchNorm3d(EstimatorBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (input (N, C, D, H, W)) with a pluggable running estimator.

    Same arguments as torch's, plus ``estimator=`` (default ``EMA(0.1)``, torch's update);
    ``momentum=m`` is ``EMA(m)``, ``momentum=None`` :class:`~bnstats.CumulativeAverage`.
    """

    _dims = (5,)
    _layout = "(N, C, D, H, W)"
    batchnorm_kind = BatchNormKind(moments="kernel", fold=True, rank=5)


# -- the one-pass tools' switch ---------------------------------------------------------------


def kernel_writes_moments(layer: nn.Module) -> bool:
    """True when ``layer``'s kind (:mod:`bnstats.torch.kinds`) takes its moments from the
    kernel (one call of torch's BN kernel over the whole input with the layer's update
    weight) and its buffers are float32/float64: with weight 1 the kernel then leaves each
    batch's mean and unbiased variance in the buffers. Not for an uninitialized lazy layer,
    nor for a synchronising one (``nn.SyncBatchNorm``, timm's ``SyncBatchNormAct``) under a
    torch.distributed process group, whose statistics would not be this process's.
    """
    kind = kind_of(layer)
    if kind is None or kind.moments != "kernel" or is_lazy_uninitialized(layer):
        return False
    running_var = getattr(layer, "running_var", None)
    if running_var is None or running_var.dtype not in _KERNEL_BUFFER_DTYPES:
        return False
    return not (kind.synced and process_group_initialized())
