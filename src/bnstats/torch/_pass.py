"""The pass of recalibrate, audit and adapt: every BN layer's exact population moments.

The model runs over the batches in the mode of the pass (:func:`pass_mode`: in a train-mode
pass its BN layers in training mode, each normalizing with its batch's own ``mu`` and biased
``var``, every other module in eval mode), autograd off, each batch on the model's device.
For each call of a measured BN layer, with ``count = numel / C`` values per channel, the
batch's per-channel ``mean`` and ``m2 = var * count`` come from torch's own kernels:

- torch's own layers and timm's ``BatchNormAct2d`` (forward not replaced,
  :func:`takes_own_forward`) run :func:`kernel_forward` for the pass: the call their
  forward makes in training, ``torch.batch_norm(..., training=True, momentum=1.0, ...)``,
  then their tail modules, with the batch's row of the layer's block
  (:meth:`LayerPass.kernel_slot`) as running buffers, so the kernel that
  normalizes the batch also writes its mean and unbiased variance there; the layer's own
  buffers are not touched. No extra pass over the activations, no hook.
- bnstats' layers whose forward is that kernel call
  (:func:`bnstats.torch.modules.kernel_writes_moments`) update with weight 1 for the pass
  and a forward pre-hook copies their buffers at the layer's next call.
- any other layer (its own forward, half-precision buffers, ``float64_moments=True``, an
  eval-mode level): the pre-hook takes the moments with ``torch.batch_norm_update_stats``
  (``torch.var_mean`` in float64 with ``float64_moments``).

Per layer the batches gather on the device and are merged, 64 at a time, into a
:class:`bnstats.Population` (Chan et al. 1979, in float64) and a
:class:`bnstats.stats.BatchSpread` (the precision), with no host read: a batch with NaN or
Inf weighs nothing and is remembered by index; the pass reads the verdict once, at the end.
Layers whose gathered batches are kernel rows of the same batches merge side by side in one
set of operations (:func:`flush_together`, :mod:`bnstats.torch._many_layers`), and so do
their precision and their new buffers at the end of the pass.
Across ``torch.distributed`` ranks each rank's Populations travel in one ``all_gather``
(:func:`bnstats.torch._ranks.exchange`) and every rank merges them in rank order, so all
ranks end with bit-identical numbers.

The model is left exactly as found, also on error (:func:`pass_mode`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnstats._array import largest, widen
from bnstats.stats import BatchSpread, NonFiniteStatisticsError, Population, miss_probability
from bnstats.torch._layers import (
    PreservedState,
    batchnorm_train_mode,
    default_forward,
    display_name,
    fewer_than_two_values,
    find_batchnorm_layers,
    fixed_statistics_layers,
    is_lazy_uninitialized,
    iterate_batches,
    layer_label,
    model_device,
    move_to_device,
    on_device,
    pass_progress,
    process_group_initialized,
    uninitialized_lazy_error,
    unwrap,
    write_buffers,
)
from bnstats.torch._many_layers import channel_relative_errors, merge_rows
from bnstats.torch._ranks import (
    check_same_layers,
    exchange,
    layout_of,
    resolve_group,
    run_and_exchange,
)
from bnstats.torch.kinds import plain_forward_tail
from bnstats.torch.modules import EstimatorBatchNorm, kernel_writes_moments
from bnstats.torch.options import CHECK_EVERY, MIN_BATCHES, PassOptions

_NARROW = (torch.float16, torch.bfloat16)
_GROUP = 64
"""Batches gathered per layer before they are merged into its Population."""
_SWAPPED = ("running_mean", "running_var", "num_batches_tracked")
_TORCH_FORWARD = nn.modules.batchnorm._BatchNorm.forward


Statistics = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""Per BN layer (qualified name) a per-channel ``(mean, var)`` to normalize with in eval mode."""


@dataclass(frozen=True)
class Level:
    """What one pass measures, and how the model runs in it.

    :data:`TRAIN`, the pass of ``mode="train"``: every BN layer in training mode, measured.
    Every other level runs every module in eval mode and measures the input of each BN layer,
    which normalizes, by ``rule``:

    - ``"exact"`` (a level of ``mode="eval_exact"``, see
      :func:`bnstats.torch._measure.measure_eval_exact`): the ``settled`` layers with their
      final populations' ``mean`` and unbiased ``var``; every other BN layer is measured and
      outputs NaN, so that each layer computed from it sees NaN and waits for a later level.
    - ``"batch"``: each call with its input's own ``mean`` and biased ``var``, as in training
      (with its buffers where the input has fewer than 2 values per channel);
    - ``"fixed"``: with ``statistics`` (a layer without an entry with its buffers);
    - ``"tracked"``: each batch runs twice. First with ``statistics`` (the reference; each
      call's input moments ``m_r, v_r`` are kept), then each call with ``base`` (the
      population of the reference run's input) moved as the input moved (``m_t, v_t``)::

          mean = m_t + a * (base_mean - m_r),   var = base_var * a**2,   a**2 = v_t / v_r

      the statistics the population would have if the change of the input from the
      reference were affine per channel (exact for such changes; ``a = 1`` where
      ``v_r = 0``). The second run is measured.
    """

    training: bool = True
    settled: Mapping[str, Population] = field(default_factory=dict)
    rule: str = "exact"
    statistics: Statistics = field(default_factory=dict)
    base: Statistics = field(default_factory=dict)
    awaited: frozenset[str] = frozenset()
    """Layers a ``tolerance`` stop waits for until a forward reaches them, beside every
    layer under ``unreached="raise"`` (an eval-mode level: those an earlier one reached)."""

    def all_awaited_reached(self, watched: Iterable[LayerPass], options: PassOptions) -> bool:
        """True when each watched layer the tolerance stop waits for has had a batch."""
        waits = options.unreached == "raise"
        return all(m.batches for m in watched if waits or m.name in self.awaited)

    def measures(self, name: str) -> bool:
        return name not in self.settled

    @property
    def least_values(self) -> int:
        """Values per channel a measured layer needs: 2 to normalize with the batch's
        statistics, 1 in eval mode."""
        return 2 if self.training else 1

    @property
    def label(self) -> str:
        if self.training:
            return "BN statistics"
        if self.rule == "exact":
            return f"eval mode, {len(self.settled)} layers settled"
        return f"eval mode ({self.rule})"


TRAIN = Level()


@dataclass
class LayerPass:
    """One BN layer during a pass: its ``population`` of every value it received (float64),
    the ``spread`` between its batches (the precision of the population), how many batch
    statistics were merged (``batches``: one per call), the most calls one forward made
    (``max_calls_per_forward``) and when the first forward reached it. The spread's center
    is the layer's ``running_mean`` when the pass began. ``precise=False``: the spread is not
    measured (a pass nobody asks the precision of: its relative errors are infinite)."""

    name: str
    layer: nn.Module
    population: Population = field(default_factory=Population)
    spread: BatchSpread = field(default_factory=BatchSpread)
    batches: int = 0
    max_calls_per_forward: int = 0
    first_reached: int | None = None
    precise: bool = True
    calls_this_forward: int = field(default=0, repr=False)
    _pending: list[tuple[int, int, torch.Tensor]] = field(default_factory=list, repr=False)
    _awaiting: tuple[int, int] | None = field(default=None, repr=False)
    _verdict: torch.Tensor | None = field(default=None, repr=False)
    _reference: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _block: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _slot_indices: list[int] = field(default_factory=list, repr=False)
    _slot_counts: list[int] = field(default_factory=list, repr=False)
    _own_buffers: dict[str, torch.Tensor | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.spread.center is None and not is_lazy_uninitialized(self.layer):
            self.spread.center = wide_copy(self.layer.running_mean)

    @property
    def label(self) -> str:
        return layer_label(self.name)

    def add_batch(self, index: int, count: int, mean_m2: torch.Tensor) -> None:
        """Gather batch ``index``: ``count`` values per channel, its per-channel ``mean`` and
        ``m2`` stacked (2, C). Merged into :attr:`population` by :meth:`flush`."""
        self._pending.append((index, count, mean_m2))
        self.batches += 1
        if len(self._pending) >= _GROUP:
            self.flush()

    def kernel_slot(self, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair of tensors the kernel writes batch ``index``'s mean and unbiased variance
        into (``count`` values per channel; they become the layer's running buffers for the
        call): a row each of two blocks of ``_GROUP`` zeroed rows made once per group (zero,
        as ``momentum = 1`` still weighs the old value by 0, and ``0 * NaN`` is NaN)."""
        row = len(self._slot_indices)
        if self._block is None or row == _GROUP:
            self.flush()
            own, row = self._own_buffers or self.layer._buffers, 0
            like = own["running_var"]
            means = torch.zeros((_GROUP, like.shape[0]), dtype=like.dtype, device=like.device)
            self._block = (means, torch.zeros_like(means))
        self._slot_indices.append(index)
        self._slot_counts.append(count)
        self.batches += 1
        means, variances = self._block
        return means[row], variances[row]  # indexing: the fastest way to a row's view

    def _gathered(self) -> tuple[torch.Tensor, list[int], list[int]] | None:
        """Every gathered batch as ``(stacked (batches, 2, C) float64, indices, counts)``: those
        of :meth:`add_batch` and those the kernel wrote into the block (``m2 = var * (count -
        1)``; the block's unused rows are dropped); None if there is none."""
        parts, indices, counts = [], [], []
        if self._pending:
            parts.append(torch.stack([part for _, _, part in self._pending]))
            indices += [index for index, _, _ in self._pending]
            counts += [count for _, count, _ in self._pending]
        used = self._slot_counts
        if used and self._block is not None:
            means, variances = (rows[: len(used)] for rows in self._block)
            weights = on_device([count - 1 for count in used], variances.dtype, variances.device)
            parts.append(torch.stack((means, variances * weights[:, None]), dim=1))
            indices += self._slot_indices
            counts += used
        self.clear_gathered()
        if not parts:
            return None
        return widen(parts[0] if len(parts) == 1 else torch.cat(parts)), indices, counts

    def flush(self) -> None:
        """Merge the gathered batches at once; a batch with NaN or Inf weighs nothing, and the
        verdict ``[first bad batch index or inf, batches skipped]`` stays on the device."""
        gathered = self._gathered()
        if gathered is None:
            return
        stacked, batch_indices, batch_counts = gathered  # (batches, 2, C)
        finite = torch.isfinite(stacked).flatten(1).all(dim=1)
        counts = on_device(batch_counts, stacked.dtype, stacked.device) * finite
        indices = on_device(batch_indices, stacked.dtype, stacked.device)
        clean = torch.where(finite[:, None, None], stacked, torch.zeros_like(stacked))
        self.population.update_batches(counts, clean[:, 0], clean[:, 1])
        if self.precise:
            self.spread.update_batches(counts, clean[:, 0], clean[:, 1])
        self.merge_verdict(
            torch.stack(
                (torch.where(finite, math.inf, indices).min(), (~finite).sum(dtype=stacked.dtype))
            )
        )

    def merge_verdict(self, verdict: torch.Tensor) -> None:
        """Add a flush's ``[first bad batch index or inf, batches skipped]`` to the layer's."""
        if self._verdict is not None:
            verdict = torch.stack(
                (torch.minimum(self._verdict[0], verdict[0]), self._verdict[1] + verdict[1])
            )
        self._verdict = verdict

    def clear_gathered(self) -> None:
        """Forget the gathered batches (merged by now)."""
        self._pending, self._block = [], None
        self._slot_indices, self._slot_counts = [], []

    def rows_key(self) -> tuple[Any, ...] | None:
        """What layers whose gathered batches merge together (:func:`flush_together`) share:
        the batches of their kernel rows, the rows' dtype and device; None for a layer that
        gathered anything else, or nothing."""
        if self._pending or not self._slot_indices or self._block is None:
            return None
        rows = self._block[0]
        return tuple(self._slot_indices), rows.dtype, rows.device, self.precise

    def standard_errors(self, finite_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the standard errors of the population ``mean`` and unbiased ``var``
        over ``finite_batches`` batches (:meth:`bnstats.stats.BatchSpread.standard_errors`)."""
        if self.population.mean is None:
            infinite = torch.full((int(self.layer.num_features),), math.inf, dtype=torch.float64)
            return infinite, infinite
        return self.spread.standard_errors(self.population, finite_batches)

    def relative_error(self, finite_batches: int) -> torch.Tensor:
        """The worst channel's relative standard error, on the device
        (:meth:`bnstats.stats.BatchSpread.relative_error`)."""
        return self.spread.relative_error(self.population, finite_batches)

    def take_kernel_moments(self, nonfinite: str) -> None:
        """Gather the mean and unbiased variance the kernel wrote at the layer's last call
        (if not gathered yet); under ``nonfinite="skip"`` clear NaN from the buffers, as
        ``0 * NaN`` would persist into the next call's update."""
        if self._awaiting is None:
            return
        (index, count), self._awaiting = self._awaiting, None
        layer = self.layer
        mean_m2 = torch.stack((layer.running_mean, layer.running_var * (count - 1)))
        self.add_batch(index, count, mean_m2)
        if nonfinite == "skip":
            layer.running_mean.nan_to_num_(0.0, 0.0, 0.0)
            layer.running_var.nan_to_num_(1.0, 1.0, 1.0)


@dataclass
class Measured:
    """What a pass measured: every BN layer's :class:`LayerPass` by qualified name, the sizes
    of the batches used, the layers no forward reached (kept as they were under
    ``unreached="keep"``), the layers with fixed statistics (found and left alone), and the
    batches skipped for NaN or Inf per layer (``nonfinite="skip"``)."""

    layers: dict[str, LayerPass]
    batch_sizes: list[int | None]
    unreached: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    first_bad: tuple[str, int] | None = None
    passes: int = 1
    moved: dict[str, float] = field(default_factory=dict)
    converged: bool | None = None

    def finite_batches(self, moments: LayerPass) -> int:
        """Batches of ``moments`` that entered its population (none with NaN or Inf)."""
        return moments.batches - self.skipped.get(moments.name, 0)

    def reached(self) -> list[LayerPass]:
        """The layers some forward reached, in the order the first forward reached them."""
        reached = [m for m in self.layers.values() if m.name not in self.unreached]
        return sorted(reached, key=lambda m: m.first_reached or 0)

    def population(self, moments: LayerPass) -> Population:
        """``moments.population``, with :class:`NonFiniteStatisticsError` naming the layer if
        every batch it received was left out for NaN or Inf, or if its statistics are NaN or
        Inf (a finite batch too large for float64, say)."""
        self.require_finite_batches(moments)
        population = moments.population
        if not bool(torch.isfinite(population.m2).all() & torch.isfinite(population.mean).all()):
            raise NonFiniteStatisticsError(
                f"{moments.label}: the population statistics are NaN or Inf after "
                f"{moments.batches} batches; nothing was written"
            )
        return population

    def require_finite_batches(self, moments: LayerPass) -> None:
        """:class:`NonFiniteStatisticsError` naming the layer if every batch it received was
        left out for NaN or Inf (no host read)."""
        if moments.batches and not self.finite_batches(moments):
            raise NonFiniteStatisticsError(
                f"{moments.label}: all {moments.batches} batches it received brought NaN or "
                "Inf statistics and were left out, so there is nothing to measure; nothing "
                "was written"
            )

    def read_verdicts(self) -> None:
        """The one host read of the pass: per layer, the first batch with NaN or Inf and how
        many batches were left out for it (into :attr:`first_bad` and :attr:`skipped`)."""
        judged = [m for m in self.layers.values() if m._verdict is not None]
        if not judged:
            return
        verdicts = torch.stack([m._verdict for m in judged]).cpu().tolist()
        pairs = list(zip(judged, verdicts, strict=True))
        index, _, name = min((index, m.first_reached or 0, m.name) for m, (index, _) in pairs)
        if math.isfinite(index):
            self.first_bad = (name, int(index))
        self.skipped = {m.name: int(skipped) for m, (_, skipped) in pairs if skipped}

    def check_coverage(self, options: PassOptions, world_size: int = 1) -> None:
        """No batch at all, or (``unreached="raise"``) a layer no forward reached, fails the
        pass; under ``unreached="keep"`` those layers are listed in :attr:`unreached`."""
        where = "" if world_size == 1 else f" on any of the {world_size} ranks"
        if not self.batch_sizes:
            raise ValueError(
                f"batches yielded no batch{where}; there is nothing to measure statistics on"
            )
        self.unreached = [name for name, m in self.layers.items() if m.batches == 0]
        if self.unreached and options.unreached == "raise":
            names = ", ".join(display_name(name) for name in self.unreached)
            raise ValueError(
                f"no forward{where} reached BN layer(s) {names} in {len(self.batch_sizes)} "
                "batches, so their statistics cannot be measured; nothing was written. If a "
                "layer is used only in training mode (an auxiliary head), pass forward=... that "
                "calls it, or unreached='keep' to leave such layers as they are"
            )


def raise_if_bad(first_bad: tuple[str, int] | None, options: PassOptions, where: str = "") -> None:
    """Under ``nonfinite="raise"``, fail the pass at the first batch that brought NaN or Inf."""
    if first_bad is None or options.nonfinite != "raise":
        return
    name, index = first_bad
    raise NonFiniteStatisticsError(
        f"{layer_label(name)}: batch {index} (counting from 0){where} brought NaN or Inf "
        "statistics; nothing was written. Pass nonfinite='skip' to leave such batches out"
    )


# -- the model in the mode of a pass ----------------------------------------------------------


@contextmanager
def pass_mode(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    level: Level,
    kernel: set[str],
    own_forward: Collection[str] = (),
) -> Iterator[PreservedState]:
    """Everything one pass sets on ``model`` (unwrapped; ``layers`` its BN layers), undone on
    exit, also on error; autograd is off within.

    The ``own_forward`` layers run :func:`kernel_forward`, which writes none of their buffers
    (not recorded, nothing to put back). A training level: every BN layer in training mode,
    every other module in eval mode
    (:func:`bnstats.torch._layers.batchnorm_train_mode`); every SyncBatchNorm local
    (:func:`local_batch_statistics`); the ``kernel`` layers update with weight 1 from finite
    buffers (``0 * NaN`` would persist): torch's through ``momentum = 1``, bnstats' through
    their ``_pass_weight``; bnstats' other layers normalize each batch with its own
    statistics (ghost batches, renorm's ``r, d``) and leave their buffers alone
    (``_pass_weight = 0``): the pass measures them itself. An eval-mode level: every module
    in eval mode, the settled layers' buffers holding their populations. Modes, momenta,
    buffers, hooks and the ``_pass_weight`` switches come back through the
    :class:`PreservedState` this yields, also on Ctrl-C.
    """
    ours = [(name, m) for name, m in layers.items() if isinstance(m, EstimatorBatchNorm)]
    with ExitStack() as stack:
        state = stack.enter_context(
            PreservedState(model, layers, transient=("_pass_weight",), unwritten=own_forward)
        )
        stack.enter_context(torch.no_grad())
        if level.training:
            batchnorm_train_mode(model, layers)
            stack.enter_context(local_batch_statistics(model))
            for name in kernel:
                if not isinstance(layers[name], EstimatorBatchNorm):
                    layers[name].momentum = 1.0
                layers[name].running_mean.zero_()
                layers[name].running_var.fill_(1.0)
            for name, layer in ours:
                layer._pass_weight = 1.0 if name in kernel else 0.0
        else:
            model.eval()
            settled = {name: (p.mean, p.var) for name, p in level.settled.items()}
            normalize_with(layers, settled if level.rule == "exact" else level.statistics)
        yield state


def normalize_with(layers: Mapping[str, nn.Module], statistics: Statistics) -> None:
    """Write ``statistics`` into the running buffers of ``layers`` (those present)."""
    write_buffers(
        {
            layers[name]: {"running_mean": mean, "running_var": var}
            for name, (mean, var) in statistics.items()
            if name in layers and not is_lazy_uninitialized(layers[name])
        }
    )


@contextmanager
def local_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.SyncBatchNorm`` (its subclasses too) normalizes with its
    local batch's statistics without any collective, its own forward still running.

    Under an initialized process group a SyncBatchNorm in training mode all-gathers each
    batch's statistics (and refuses CPU input); the pass must stay local. Such a layer is
    put in eval mode with its running buffers hidden: torch's forward then normalizes with
    the batch's statistics (``bn_training``) and syncs nothing; the forward pre-hook
    measures the batch. Flags and buffers are put back afterwards, also on error.
    """
    if not process_group_initialized():
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    saved = [(m, m.training, m._buffers["running_mean"], m._buffers["running_var"]) for m in layers]
    try:
        for layer in layers:
            layer.training = False
            layer._buffers["running_mean"] = layer._buffers["running_var"] = None
        yield
    finally:
        for layer, training, mean, var in saved:
            layer.training = training
            layer._buffers["running_mean"], layer._buffers["running_var"] = mean, var


# -- the pass on this process -----------------------------------------------------------------


def wide_copy(buffer: torch.Tensor) -> torch.Tensor:
    """A copy of ``buffer`` in the precision statistics accumulate in (one operation)."""
    wide = widen(buffer.detach() if buffer.requires_grad else buffer)
    return wide.clone() if wide is buffer else wide


def batch_moments(x: torch.Tensor, float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and BIASED ``var`` of ``x`` (N, C, ...) over all axes but 1, widened.

    ``torch.batch_norm_update_stats`` (the kernel training BN uses; float16 and bfloat16 off
    CUDA are upcast to float32 first, as the CPU kernel would return half-precision moments);
    ``float64=True``: ``torch.var_mean`` of ``x`` in float64.
    """
    if float64:
        axes = (0, *range(2, x.dim()))
        var, mean = torch.var_mean(widen(x), dim=axes, correction=0)
        return mean, var
    if x.dtype in _NARROW and x.device.type != "cuda":
        x = x.float()
    if channels_last_on_cpu(x):
        return _channels_last_moments(x)
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return widen(mean), widen(var)


def channels_last_on_cpu(x: torch.Tensor) -> bool:
    """True for a channels-last CPU tensor (N, C, ...), whose moments torch's CPU kernel sums
    value by value in float32 (9e-6 off on 32x64x28x28 with mean 5, std 3; the contiguous
    kernel 8e-8); :func:`batch_moments` takes them by :func:`_channels_last_moments`."""
    if x.is_contiguous() or x.dim() not in (4, 5) or x.device.type != "cpu":
        return False
    return x.movedim(1, -1).is_contiguous()


_ROWS_PER_COLUMN = 32
"""Channels-last moments: at most this many values per partial sum (float32 rounding of a
sum of n values grows with n; 32 keeps it at or below the contiguous kernel's)."""


def _channels_last_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and biased ``var`` of a channels-last CPU tensor, as precise as the
    contiguous kernel's (a channels-last ResNet-18-shaped model: 2.2e-7 from float64 moments
    where the kernel's are 1.3e-6 off; a conv-BN stack with means 3 standard deviations out:
    7.5e-8 against 5.4e-5), for about 25 % more time per pass on such models.

    The memory as it lies is ``R = numel / C`` rows of ``C`` values; read as ``R / G`` rows of
    ``G * C`` columns (``G`` the smallest divisor of ``R`` leaving at most 32 rows), one
    kernel call gives each column's ``m_g, v_g`` from short sums; the ``G`` columns of each
    channel, equal in size, merge in float64::

        mean = sum_g m_g / G,   var = sum_g (v_g + (m_g - mean)**2) / G
    """
    channels = x.shape[1]
    rows = x.numel() // channels
    groups = _groups(rows)
    columns = x.movedim(1, -1).reshape(rows // groups, groups * channels)
    means, variances = torch.batch_norm_update_stats(columns, None, None, 0.0)
    means, variances = widen(means).view(groups, channels), widen(variances).view(groups, channels)
    mean = means.mean(dim=0)
    return mean, (variances + (means - mean) ** 2).mean(dim=0)


def _groups(rows: int) -> int:
    """The smallest divisor ``G`` of ``rows`` with ``rows / G <= 32`` (``rows`` itself at worst)."""
    groups = max(1, -(-rows // _ROWS_PER_COLUMN))
    while rows % groups:
        groups += 1
    return groups


def check_layer_input(moments: LayerPass, x: Any, least: int = 2) -> int:
    """Values per channel in ``x``; ``TypeError``/``ValueError`` naming the layer if unusable
    (fewer than ``least`` values per channel: 2 where the layer normalizes with the batch's
    statistics, 1 in an eval-mode pass)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{moments.label} was called on a {type(x).__name__}, not a tensor")
    shape, features = tuple(x.shape), moments.layer.num_features
    if len(shape) < 2 or shape[1] != features:
        raise ValueError(
            f"{moments.label}: expected input of shape (N, {features}, ...), got {shape}"
        )
    count = x.numel() // shape[1]
    if count < least:
        raise ValueError(
            fewer_than_two_values(moments.label, shape)
            + " (drop batches of one sample, choose max_samples so that the last batch "
            "keeps 2 or more, or pass mode='eval', which needs no batch statistics)"
        )
    return count


class _Recorder:
    """The hooks of one pass and its batch count: per call of a measured layer, gather what
    the kernel wrote at the layer's previous call (one hook per layer, not two), check the
    input, then leave this call's moments to the kernel or take them here; in an eval-mode
    level, set the statistics the call normalizes with by the level's rule."""

    def __init__(
        self, state: PreservedState, kernel: set[str], options: PassOptions, level: Level
    ) -> None:
        self.state, self.kernel, self.options, self.level = state, kernel, options, level
        self.watched: list[LayerPass] = []
        self.batch_index = 0
        self.reached = 0
        self.reference_run = False
        self.original: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def watch(self, moments: LayerPass, own_forward: bool = False) -> None:
        """Measure ``moments.layer`` at each call (in an exact level its output becomes NaN);
        ``own_forward``: through the pass's own forward in place of torch's
        (:func:`kernel_forward`), else through a forward pre-hook."""
        self.watched.append(moments)
        layer = moments.layer
        if own_forward:
            layer.__dict__["forward"] = kernel_forward(self, moments)
            self.state.add_hook(_InstanceForward(layer))
            return
        self.state.add_hook(layer.register_forward_pre_hook(self._hook(moments), with_kwargs=True))
        if not self.level.training and self.level.rule == "exact":
            self.state.add_hook(layer.register_forward_hook(_unsettled_output))

    def run(self, forward: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any) -> None:
        """``forward(model, batch)`` on the next batch, counting each layer's calls in it (in a
        tracked level after the reference run, see :class:`Level`)."""
        for moments in self.watched:
            moments.calls_this_forward = 0
        if not self.level.training and self.level.rule == "tracked":
            for moments in self.watched:
                moments._reference.clear()
            normalize_with({m.name: m.layer for m in self.watched}, self.level.statistics)
            self.reference_run = True
            try:
                forward(model, batch)
            finally:
                self.reference_run = False
        forward(model, batch)
        self.batch_index += 1

    def finish(self) -> None:
        """Take what the kernel wrote at each layer's last call, and merge what is gathered."""
        for moments in self.watched:
            moments.take_kernel_moments(self.options.nonfinite)
        flush_together(self.watched)

    def _hook(self, moments: LayerPass) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if self.reference_run:
                if isinstance(x, torch.Tensor) and x.dim() >= 2:
                    moments._reference.append(batch_moments(x.detach()))
                return
            if moments._awaiting is not None:
                moments.take_kernel_moments(self.options.nonfinite)
            self.state.record_buffers(moments.name)  # a LazyBatchNorm is initialized by now
            count = check_layer_input(moments, x, self.level.least_values)
            if moments.spread.center is None:
                moments.spread.center = wide_copy(module.running_mean)
            if (
                moments.name in self.kernel
                and x.dtype == module.running_var.dtype
                and not channels_last_on_cpu(x)
            ):
                if isinstance(module, EstimatorBatchNorm):
                    moments._awaiting = (self.batch_index, count)
                else:
                    self._lend_slot(moments, module, count)
            else:
                mean, var = batch_moments(x.detach(), self.options.float64_moments)
                moments.add_batch(self.batch_index, count, torch.stack((mean, var * count)))
                if not self.level.training:
                    self._normalize_call(moments, module, mean, var, count)
            self.count_call(moments)

        return pre_hook

    def count_call(self, moments: LayerPass) -> None:
        """One more call of ``moments.layer`` in this forward (the first reach numbered)."""
        calls = moments.calls_this_forward = moments.calls_this_forward + 1
        if calls > moments.max_calls_per_forward:
            moments.max_calls_per_forward = calls
        if moments.first_reached is None:
            self.reached += 1
            moments.first_reached = self.reached

    def _lend_slot(self, moments: LayerPass, module: nn.Module, count: int) -> None:
        """Point the layer's running buffers at this batch's slot (:meth:`LayerPass.kernel_slot`),
        and hide ``num_batches_tracked`` from torch's own forward (with ``momentum = 1`` it
        reads nothing else): the call costs the kernel's operations and no more. The layer's
        own buffers come back in :meth:`return_buffers`."""
        buffers = module._buffers
        if moments._own_buffers is None:
            moments._own_buffers = {key: buffers.get(key) for key in _SWAPPED}
            if type(module).forward is _TORCH_FORWARD:
                buffers["num_batches_tracked"] = None
        buffers["running_mean"], buffers["running_var"] = moments.kernel_slot(
            self.batch_index, count
        )

    def return_buffers(self) -> None:
        """Give every layer its own running buffers back (after the pass, also on error)."""
        for moments in self.watched:
            own, moments._own_buffers = moments._own_buffers, None
            if own is not None:
                for key, buffer in own.items():
                    if key in moments.layer._buffers:
                        moments.layer._buffers[key] = buffer

    def _normalize_call(
        self,
        moments: LayerPass,
        module: nn.Module,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: int,
    ) -> None:
        """The statistics this call normalizes with, by the level's rule (:class:`Level`)."""
        rule = self.level.rule
        if rule == "batch":
            if moments.name not in self.original:  # for inputs of one value per channel
                self.original[moments.name] = (
                    module.running_mean.detach().clone(),
                    module.running_var.detach().clone(),
                )
            statistics = (mean, var) if count >= 2 else self.original[moments.name]
        elif rule == "tracked":
            call, base = moments.calls_this_forward, self.level.base.get(moments.name)
            if base is None or call >= len(moments._reference):
                return
            statistics = transported(base, moments._reference[call], (mean, var))
        else:
            return
        module.running_mean.copy_(statistics[0])
        module.running_var.copy_(statistics[1])


def takes_own_forward(layer: nn.Module) -> bool:
    """True for a layer whose forward is its kind's plain one (torch's BatchNorm1d/2d/3d and
    timm's BatchNormAct2d, subclasses that keep it; see
    :func:`bnstats.torch.kinds.plain_forward_tail`), not bnstats' own: in a train-mode pass
    it runs :func:`kernel_forward` instead, the same kernel call and tail without the
    bookkeeping around them."""
    return (
        plain_forward_tail(layer) is not None
        and not isinstance(layer, EstimatorBatchNorm)
        and not is_lazy_uninitialized(layer)
    )


def kernel_forward(recorder: _Recorder, moments: LayerPass) -> Callable[[torch.Tensor], Any]:
    """The forward of a :func:`takes_own_forward` layer during a train-mode pass: the call
    torch's forward makes in training, ``torch.batch_norm(input, weight, bias, mean, var,
    True, 1.0, eps)``, with ``mean, var`` this batch's row of the layer's block
    (:meth:`LayerPass.kernel_slot`), where the kernel writes the batch's mean and unbiased
    variance; the layer's own buffers and ``num_batches_tracked`` are not touched. An input
    the kernel would not measure exactly (another dtype than the buffers, channels-last on
    the CPU) is measured by :func:`batch_moments` and normalized without running buffers.
    Then the layer's tail modules, in order (timm's ``drop`` and ``act``; a missing one or
    None skipped, as those forwards do). Same output as the layer's own forward; checks
    first, naming the layer (:func:`check_layer_input`, then the layer's dimension check)."""
    layer = moments.layer
    kernel_dtype = layer.running_var.dtype  # the pass writes none of the layer's buffers
    cudnn = torch.backends.cudnn.enabled  # as torch's forward reads it, once per pass
    tail = [
        module
        for name in plain_forward_tail(layer) or ()
        if (module := layer._modules.get(name)) is not None
    ]

    def forward(input: torch.Tensor) -> Any:  # noqa: A002 (torch's own name for it)
        count = check_layer_input(moments, input)
        layer._check_input_dim(input)
        mean = var = None
        if input.dtype == kernel_dtype and not channels_last_on_cpu(input):
            mean, var = moments.kernel_slot(recorder.batch_index, count)
        else:
            taken = batch_moments(input.detach(), recorder.options.float64_moments)
            moments.add_batch(
                recorder.batch_index, count, torch.stack((taken[0], taken[1] * count))
            )
        recorder.count_call(moments)
        output = torch.batch_norm(
            input, layer.weight, layer.bias, mean, var, True, 1.0, layer.eps, cudnn
        )
        for module in tail:
            output = module(output)
        return output

    return forward


class _InstanceForward:
    """Removes a pass's :func:`kernel_forward` from its layer (as a hook handle would)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def remove(self) -> None:
        self.layer.__dict__.pop("forward", None)


def transported(
    base: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    now: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``base`` (a population's ``mean``, ``var``) moved by the per-channel affine map that
    takes a batch's moments from ``reference`` to ``now`` (each ``mean``, biased ``var``)::

        a**2 = v_t / v_r  (1 where v_r = 0),   mean = m_t + a * (base_mean - m_r),
        var = base_var * a**2
    """
    (base_mean, base_var), (m_r, v_r), (m_t, v_t) = base, reference, now
    base_mean, base_var = base_mean.to(m_t), base_var.to(m_t)
    ratio = torch.where(v_r > 0, v_t / torch.where(v_r > 0, v_r, 1.0), 1.0)
    return m_t + ratio.sqrt() * (base_mean - m_r), base_var * ratio


def flush_together(layers: Iterable[LayerPass]) -> None:
    """:meth:`LayerPass.flush` of every layer; those whose gathered batches are kernel rows of
    the same batches (:meth:`LayerPass.rows_key`) merge in one set of operations
    (:func:`bnstats.torch._many_layers.merge_rows`)."""
    groups: dict[tuple[Any, ...], list[LayerPass]] = {}
    for moments in layers:
        key = moments.rows_key()
        if key is None:
            moments.flush()
        else:
            groups.setdefault(key, []).append(moments)
    for group in groups.values():
        for part in _parts_in_cache(group):
            if len(part) == 1:
                part[0].flush()
            else:
                merge_rows(part)


_MERGED_VALUES = 16384
"""The most ``batches x channels`` :func:`merge_rows` takes at once, so that its float64
temporaries (128 KiB each) stay in the CPU's cache: on a wide model, arrays of a megabyte
cost several times more per value (mobilenet_v2's 17,056 channels over 8 batches: the end
of a pass 15 ms in one part, about 11 in parts)."""


def _parts_in_cache(group: list[LayerPass]) -> Iterator[list[LayerPass]]:
    """``group`` in consecutive parts of at most :data:`_MERGED_VALUES` gathered values (a
    wider layer alone) on the CPU; elsewhere whole (on a GPU every part would cost its own
    kernel launches)."""
    if group[0]._block[0].device.type != "cpu":  # a group has kernel rows (rows_key)
        yield group
        return
    part: list[LayerPass] = []
    values = 0
    for moments in group:
        size = len(moments._slot_indices) * int(moments.layer.num_features)
        if part and values + size > _MERGED_VALUES:
            yield part
            part, values = [], 0
        part.append(moments)
        values += size
    if part:
        yield part


def _unsettled_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """An eval-mode level: the output of a layer whose statistics are not final yet is NaN,
    so that every layer computed from it sees NaN and waits for a later level."""
    return torch.full_like(output, math.nan) if isinstance(output, torch.Tensor) else output


def collect_moments(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    level: Level = TRAIN,
    check_coverage: bool = True,
    precise: bool = True,
) -> Measured:
    """One pass of ``model`` (unwrapped) over ``batches`` at ``level``: every BN layer's
    population moments (the settled layers of an eval-mode level are not measured).

    Raises ``ValueError`` if ``batches`` is empty or (``unreached="raise"``) a BN layer was
    never reached, and :class:`NonFiniteStatisticsError` naming the layer and the batch if a
    batch brought NaN or Inf (``nonfinite="raise"``), unless ``check_coverage=False`` (across
    ranks these are judged on all ranks' passes together).
    """
    layers = find_batchnorm_layers(model)
    moments = {name: LayerPass(name, layer, precise=precise) for name, layer in layers.items()}
    kernel = set()
    if level.training and not options.float64_moments:
        kernel = {name for name, layer in layers.items() if kernel_writes_moments(layer)}
    own_forward = {name for name in kernel if takes_own_forward(layers[name])}
    kernel -= own_forward
    forward, sizes = options.forward or default_forward, []
    with (
        pass_mode(model, layers, level, kernel, own_forward) as state,
        pass_progress(options.progress, level.label) as advance,
    ):
        recorder = _Recorder(state, kernel, options, level)
        for name in filter(level.measures, layers):
            recorder.watch(moments[name], own_forward=name in own_forward)
        try:
            _run_batches(recorder, model, batches, options, forward, moments, sizes, advance, level)
            recorder.finish()
        finally:
            recorder.return_buffers()
    measured = Measured(moments, sizes, fixed=list(fixed_statistics_layers(model)))
    measured.read_verdicts()
    if check_coverage:
        raise_if_bad(measured.first_bad, options)
        measured.check_coverage(options)
    return measured


def _run_batches(
    recorder: _Recorder,
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    forward: Callable[[nn.Module, Any], Any],
    moments: dict[str, LayerPass],
    sizes: list[int | None],
    advance: Callable[[int, float], None],
    level: Level,
) -> None:
    """The loop of a pass: each batch through the model, its size into ``sizes``, and with
    ``tolerance`` the stop once every channel is within it with 95 % confidence
    (:func:`judge_tolerance`) and every layer the stop waits for was reached
    (:meth:`Level.all_awaited_reached`)."""
    worst, samples, device = math.inf, 0, model_device(model)
    for batch, size in iterate_batches(batches, options.max_samples):
        recorder.run(forward, model, move_to_device(batch, device))
        sizes.append(size)
        samples += size or 0
        met = False
        if options.tolerance is not None and _time_to_check(len(sizes)):
            for layer_pass in moments.values():  # the batch just run counts too
                layer_pass.take_kernel_moments(options.nonfinite)
            worst, miss = judge_tolerance(moments.values(), options.tolerance)
            met = miss <= MISS_PROBABILITY
        advance(samples, worst)
        if met and level.all_awaited_reached(recorder.watched, options):
            return


def _time_to_check(batches: int) -> bool:
    """Every ``CHECK_EVERY`` batches from ``MIN_BATCHES`` on: time to judge a ``tolerance``
    (two host reads per check, none between)."""
    return batches >= MIN_BATCHES and not batches % CHECK_EVERY


MISS_PROBABILITY = 0.05
"""A ``tolerance`` is met when the probability that some channel lies outside it is at most
this (95 % confidence for all channels together)."""


def judge_tolerance(layers: Iterable[LayerPass], tolerance: float) -> tuple[float, float]:
    """Over the layers that received a finite batch: the worst channel's relative standard
    error, and at most the probability that some channel's mean or variance lies farther
    than ``tolerance`` from the truth (:func:`bnstats.stats.miss_probability` over every
    channel's two :meth:`~bnstats.stats.BatchSpread.relative_standard_errors`). ``(inf, inf)``
    while no layer has a finite batch."""
    layers = list(layers)
    flush_together(layers)
    live = [moments for moments in layers if moments._verdict is not None]
    if not live:
        return math.inf, math.inf
    skipped = torch.stack([m._verdict[1] for m in live]).cpu().tolist()
    judged = [(m, m.batches - int(s)) for m, s in zip(live, skipped, strict=True)]
    judged = [(m, finite) for m, finite in judged if finite > 0]
    if not judged:
        return math.inf, math.inf
    return channels_within([m for m, _ in judged], [finite for _, finite in judged], tolerance)


def channels_within(
    layers: list[LayerPass], finite_batches: list[int], tolerance: float
) -> tuple[float, float]:
    """The worst relative standard error of ``layers`` (each over its ``finite_batches``)
    and the probability, at most, that some channel lies outside ``tolerance``: one host
    read."""
    errors, _ = channel_relative_errors(layers, finite_batches)
    worst = largest(errors)
    miss = miss_probability(errors, tolerance)
    return tuple(torch.stack((worst, miss)).tolist())


# -- one pass over all ranks' batches ---------------------------------------------------------


Check = Callable[[nn.Module], None]
"""``check(model)``: validation run before the pass, on every rank inside the protocol."""
Call = str | Mapping[str, Any]
"""What the ranks compare before a pass: the tool's name (its options added from the
:class:`PassOptions`), or the whole record (:func:`bnstats.torch._measure.measure`)."""


def measure_pass(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    tool: Call,
    check: Check | None = None,
    level: Level = TRAIN,
    precise: bool = True,
) -> Measured:
    """One pass at ``level``: every BN layer's population moments over all ranks' ``batches``
    (and their precision, unless ``precise=False``).

    Without a group (see :func:`bnstats.torch._ranks.resolve_group`) this is
    :func:`collect_moments` on the unwrapped model. In a group each rank runs the pass on its
    batches; one status exchange (which also checks that every rank makes the same call:
    ``tool`` with the same options; a refusal of the options too reaches every rank); one
    ``all_gather`` of every layer's Populations; every rank
    merges them in rank order with :meth:`Population.merge`: the numbers of one process over
    all ranks' batches, rank 0's first, bit-identical on every rank. ``check(model)`` runs
    first on every rank.
    """
    chosen = resolve_group(options.group)
    inner = unwrap(model)
    if chosen is None:
        if check is not None:
            check(inner)
        return collect_moments(inner, batches, options, level=level, precise=precise)

    def local() -> tuple[Measured, dict[str, Any]]:
        if options.tolerance is not None:
            raise ValueError(
                "tolerance cannot be used across torch.distributed ranks (they would have to "
                "agree on when to stop); pass max_samples, or group=False"
            )
        if check is not None:
            check(inner)
        measured = collect_moments(
            inner, batches, options, level=level, check_coverage=False, precise=precise
        )
        _require_initialized(measured)
        layers = {name: m.layer for name, m in measured.layers.items()}
        summary = {
            "layers": layout_of(layers),
            "sizes": measured.batch_sizes,
            "first_bad": measured.first_bad,
            "skipped": measured.skipped,
        }
        return measured, summary

    call = {"tool": tool, **options.call()} if isinstance(tool, str) else dict(tool)
    measured, summaries = run_and_exchange(chosen, local, call)
    check_same_layers(chosen, [summary["layers"] for summary in summaries])
    for rank, summary in enumerate(summaries):  # the same verdict on every rank
        raise_if_bad(summary["first_bad"], options, where=f" on rank {rank}")
    skipped: dict[str, int] = {}
    for summary in summaries:
        for name, count in summary["skipped"].items():
            skipped[name] = skipped.get(name, 0) + count
    records, sizes = rank_records(measured)
    ranks = exchange(chosen, records, sizes)
    merged = Measured(
        merge_ranks(measured, ranks),
        [size for summary in summaries for size in summary["sizes"]],
        fixed=measured.fixed,
        skipped=skipped,
    )
    merged.check_coverage(options, world_size=len(ranks))
    return merged


def _require_initialized(measured: Measured) -> None:
    for name, moments in measured.layers.items():
        if is_lazy_uninitialized(moments.layer):
            raise ValueError(
                uninitialized_lazy_error(name, moments.layer)
                + "; no batch on this rank reached it, so it has no shape to receive the merged "
                "statistics: run one forward on every rank first"
            )


def rank_records(measured: Measured) -> tuple[list[Any], list[tuple[int, int, int]]]:
    """Per layer, what a rank sends: ``[[batches, calls, first reached], population flat,
    spread flat]`` (:meth:`Population.to_flat`), and the sizes of those parts."""
    records, sizes = [], []
    for moments in measured.layers.values():
        channels = int(moments.layer.num_features)
        header = [moments.batches, moments.max_calls_per_forward, moments.first_reached or 0]
        flats = [moments.population.to_flat(channels), moments.spread.to_flat(channels)]
        records.append([header, *flats])
        sizes.append((3, 2 + 2 * channels, 2 + 6 * channels))
    return records, sizes


def merge_ranks(measured: Measured, ranks: list[list[list[torch.Tensor]]]) -> dict[str, LayerPass]:
    """Each layer's Population and spread merged over the ranks' :func:`rank_records`, in rank
    order (Chan et al. 1979); ``first_reached`` by the first rank reaching it, then its order."""
    merged = {}
    order = len(measured.layers) + 1
    for index, (name, local) in enumerate(measured.layers.items()):
        result = LayerPass(
            name, local.layer, spread=BatchSpread(local.spread.center), precise=local.precise
        )
        for rank, records in enumerate(ranks):
            header, population, spread = records[index]
            batches, calls, first = (int(v) for v in header.tolist())
            part = Population.from_flat(population)
            if part.mean is not None:
                result.population = result.population.merge(part)
                result.spread = result.spread.merge(BatchSpread.from_flat(spread))
                if result.first_reached is None:
                    result.first_reached = rank * order + first
            result.batches += batches
            result.max_calls_per_forward = max(result.max_calls_per_forward, calls)
        merged[name] = result
    return merged
