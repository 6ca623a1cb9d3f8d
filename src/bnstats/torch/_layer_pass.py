"""One BN layer's part of a pass (:class:`LayerPass`): its batches' moments gathered on the
device and merged, 64 at a time, into a :class:`bnstats.Population` (Chan et al. 1979, in
float64) and a :class:`bnstats.precision.BatchSpread` (the precision), with no host read; layers
whose gathered batches are kernel rows of the same batches merge side by side
(:func:`flush_together`, :mod:`bnstats.torch._many_layers`). :class:`Measured`: what a whole
pass measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnstats._array import widen
from bnstats.precision import BatchSpread
from bnstats.stats import NonFiniteStatisticsError, Population
from bnstats.torch._layers import (
    display_name,
    is_lazy_uninitialized,
    layer_label,
    on_device,
)
from bnstats.torch._many_layers import merge_rows
from bnstats.torch.options import PassOptions

_GROUP = 64
"""Batches gathered per layer before they are merged into its Population."""


def wide_copy(buffer: torch.Tensor) -> torch.Tensor:
    """A copy of ``buffer`` in the precision statistics accumulate in (one operation)."""
    wide = widen(buffer.detach() if buffer.requires_grad else buffer)
    return wide.clone() if wide is buffer else wide


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
        over ``finite_batches`` batches (:meth:`bnstats.precision.BatchSpread.standard_errors`)."""
        if self.population.mean is None:
            infinite = torch.full((int(self.layer.num_features),), math.inf, dtype=torch.float64)
            return infinite, infinite
        return self.spread.standard_errors(self.population, finite_batches)

    def relative_error(self, finite_batches: int) -> torch.Tensor:
        """The worst channel's relative standard error, on the device
        (:meth:`bnstats.precision.BatchSpread.relative_error`)."""
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


@dataclass
class Measured:
    """What a pass measured: every BN layer's :class:`LayerPass` by qualified name, the sizes
    of the batches used, the layers no forward reached (kept as they were under
    ``unreached="keep"``), the layers with fixed statistics (found and left alone), the
    batches skipped for NaN or Inf per layer (``nonfinite="skip"``), and ``data_batches``,
    the length of the data the pass drew from (None for data without one: a ``tolerance``
    is then judged against the population they are drawn from, not the whole data's
    statistics)."""

    layers: dict[str, LayerPass]
    batch_sizes: list[int | None]
    unreached: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    first_bad: tuple[str, int] | None = None
    passes: int = 1
    moved: dict[str, float] = field(default_factory=dict)
    converged: bool | None = None
    subset_passes: int = 0
    subset_batches: int = 0
    data_batches: int | None = None

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

    def finite_population(self, moments: LayerPass) -> Population | None:
        """:meth:`population`, or None where it would raise :class:`NonFiniteStatisticsError`
        (an iterate of ``mode="eval"`` that overflowed, say)."""
        try:
            return self.population(moments)
        except NonFiniteStatisticsError:
            return None

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
