"""The pass of recalibrate, audit and adapt: every BN layer's exact population moments.

The model runs over the batches in the mode of the pass
(:func:`bnstats.torch._level.pass_mode`: in a train-mode pass its BN layers in training mode,
each normalizing with its batch's own ``mu`` and biased ``var``, every other module in eval
mode), autograd off, each batch on the model's device.
For each call of a measured BN layer, with ``count = numel / C`` values per channel, the
batch's per-channel ``mean`` and ``m2 = var * count`` come from torch's own kernels:

- torch's own layers and timm's ``BatchNormAct2d`` (forward not replaced,
  :func:`bnstats.torch._recorder.takes_own_forward`) run
  :func:`bnstats.torch._recorder.kernel_forward` for the pass: the call their
  forward makes in training, ``torch.batch_norm(..., training=True, momentum=1.0, ...)``,
  then their tail modules, with the batch's row of the layer's block
  (:meth:`bnstats.torch._layer_pass.LayerPass.kernel_slot`) as running buffers, so the kernel that
  normalizes the batch also writes its mean and unbiased variance there; the layer's own
  buffers are not touched. No extra pass over the activations, no hook.
- bnstats' layers whose forward is that kernel call
  (:func:`bnstats.torch.modules.kernel_writes_moments`) update with weight 1 for the pass
  and a forward pre-hook copies their buffers at the layer's next call.
- in the ``"fixed"`` and ``"exact"`` eval-mode levels, a forward pre-hook runs
  ``torch.batch_norm_update_stats`` with the batch's row of the layer's block as running
  buffers (``momentum = 1``), so those layers too merge side by side
  (:meth:`bnstats.torch._recorder.Recorder._into_block` says where the kernel takes the
  input).
- any other layer (its own forward, half-precision buffers, ``float64_moments=True``, the
  other eval-mode levels): the pre-hook takes the moments with
  ``torch.batch_norm_update_stats`` (``torch.var_mean`` in float64 with ``float64_moments``).

Per layer the batches gather on the device and are merged, 64 at a time, into a
:class:`bnstats.Population` (Chan et al. 1979, in float64) and a
:class:`bnstats.precision.BatchSpread` (the precision), with no host read: a batch with NaN or
Inf weighs nothing and is remembered by index; the pass reads the verdict once, at the end.
Layers whose gathered batches are kernel rows of the same batches merge side by side in one
set of operations (:func:`bnstats.torch._layer_pass.flush_together`,
:mod:`bnstats.torch._many_layers`), and so do
their precision and their new buffers at the end of the pass.
Across ``torch.distributed`` ranks each rank's Populations travel in one ``all_gather``
(:func:`bnstats.torch._ranks.exchange`) and every rank merges them in rank order, so all
ranks end with bit-identical numbers.

The model is left exactly as found, also on error (:func:`bnstats.torch._level.pass_mode`).

The parts: :mod:`bnstats.torch._level` (how the model runs in a pass),
:mod:`bnstats.torch._recorder` (what runs at each BN layer call),
:mod:`bnstats.torch._batch_moments` (a batch's moments), :mod:`bnstats.torch._layer_pass`
(each layer's batches merged; what a pass measured); here, the loop over the batches, the
``tolerance`` stop and the merge across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bnstats._progress import pass_progress
from bnstats.precision import BatchSpread
from bnstats.stats import Population
from bnstats.torch._batches import data_length, default_forward, iterate_batches, move_to_device
from bnstats.torch._layer_pass import (
    LayerPass,
    Measured,
    flush_together,
    raise_if_bad,
)
from bnstats.torch._layers import (
    find_batchnorm_layers,
    fixed_statistics_layers,
    is_lazy_uninitialized,
    model_device,
    uninitialized_lazy_error,
    unwrap,
)
from bnstats.torch._level import TRAIN, Level, pass_mode
from bnstats.torch._many_layers import layer_precision
from bnstats.torch._ranks import (
    check_same_layers,
    exchange,
    layout_of,
    resolve_group,
    run_and_exchange,
)
from bnstats.torch._recorder import Recorder, takes_own_forward
from bnstats.torch.modules import kernel_writes_moments
from bnstats.torch.options import CHECK_EVERY, MIN_BATCHES, PassOptions


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
        recorder = Recorder(state, kernel, options, level)
        for name in filter(level.measures, layers):
            recorder.watch(moments[name], own_forward=name in own_forward)
        try:
            _run_batches(recorder, model, batches, options, forward, moments, sizes, advance, level)
            recorder.finish()
        finally:
            recorder.return_buffers()
    measured = Measured(
        moments,
        sizes,
        fixed=list(fixed_statistics_layers(model)),
        data_batches=data_length(batches, len(sizes)),
    )
    measured.read_verdicts()
    if check_coverage:
        raise_if_bad(measured.first_bad, options)
        measured.check_coverage(options)
    return measured


def _run_batches(
    recorder: Recorder,
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
    (:func:`judge_tolerance`; of the whole data where they have a length that holds,
    :func:`data_length`) and every layer the stop waits for was reached
    (:meth:`Level.all_awaited_reached`). A layer still unreached when as many batches again
    have gone by as the tolerance took is given up on (so an endless loader ends): the pass
    stops, and the coverage check names it."""
    worst, samples, device = math.inf, 0, model_device(model)
    met_at: int | None = None
    for batch, size in iterate_batches(batches, options.max_samples):
        recorder.run(forward, model, move_to_device(batch, device))
        sizes.append(size)
        samples += size or 0
        met = False
        if options.tolerance is not None and _time_to_check(len(sizes)):
            for layer_pass in moments.values():  # the batch just run counts too
                layer_pass.take_kernel_moments(options.nonfinite)
            length = data_length(batches, len(sizes) + 1)  # at their end, the data end it
            worst, miss = judge_tolerance(moments.values(), options.tolerance, length)
            met = miss <= level.miss_budget
        advance(samples, worst)
        if met and level.all_awaited_reached(recorder.watched, options):
            return
        if met and met_at is None:
            met_at = len(sizes)
        if met_at is not None and len(sizes) >= 2 * met_at:
            return


def _time_to_check(batches: int) -> bool:
    """Every ``CHECK_EVERY`` batches from ``MIN_BATCHES`` on: time to judge a ``tolerance``
    (two host reads per check, none between)."""
    return batches >= MIN_BATCHES and not batches % CHECK_EVERY


def judge_tolerance(
    layers: Iterable[LayerPass], tolerance: float, data_batches: int | None = None
) -> tuple[float, float]:
    """Over the layers that received a finite batch: the worst channel's relative standard
    error, and at most the probability that some channel's mean or variance lies farther
    than ``tolerance`` from the truth (:func:`bnstats.precision.miss_probability` over every
    channel's two :meth:`~bnstats.precision.BatchSpread.relative_standard_errors`): the whole
    data's statistics where the data hold ``data_batches``, else the population they are
    drawn from. ``(inf, inf)`` while no layer has a finite batch."""
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
    worst, miss = layer_precision(
        [m for m, _ in judged], [finite for _, finite in judged], tolerance, data_batches
    )
    return tuple(torch.stack((worst.max(), miss)).tolist())


# -- one pass over all ranks' batches ---------------------------------------------------------


Check = Callable[[nn.Module], None]
"""``check(model)``: validation run before the pass, on every rank inside the protocol."""
Call = str | Mapping[str, Any]
"""What the ranks compare before a pass: the tool's name (its options added from the
:class:`PassOptions`), or the whole record (:func:`bnstats.torch._measure.measure`)."""


def call_record(tool: Call, options: PassOptions) -> dict[str, Any]:
    """The record the ranks compare for ``tool`` (:data:`Call`) under ``options``."""
    return {"tool": tool, **options.call()} if isinstance(tool, str) else dict(tool)


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

    measured, summaries = run_and_exchange(chosen, local, call_record(tool, options))
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
        first_bad=next((s["first_bad"] for s in summaries if s["first_bad"] is not None), None),
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


def rank_records(measured: Measured) -> tuple[list[Any], list[tuple[int, int, int, int]]]:
    """Per layer, what a rank sends: ``[[batches, calls, first reached], population flat,
    spread flat, spread center]`` (:meth:`Population.to_flat`; each rank's spread has its
    own center), and the sizes of those parts."""
    records, sizes = [], []
    for moments in measured.layers.values():
        channels = int(moments.layer.num_features)
        header = [moments.batches, moments.max_calls_per_forward, moments.first_reached or 0]
        flats = [moments.population.to_flat(channels), moments.spread.to_flat(channels)]
        center = moments.spread.center
        records.append([header, *flats, torch.zeros(channels) if center is None else center])
        sizes.append((3, 2 + 2 * channels, 2 + 6 * channels, channels))
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
            header, population, spread, center = records[index]
            batches, calls, first = (int(v) for v in header.tolist())
            part = Population.from_flat(population)
            if part.mean is not None:
                result.population = result.population.merge(part)
                result.spread = result.spread.merge(BatchSpread.from_flat(spread, center))
                if result.first_reached is None:
                    result.first_reached = rank * order + first
            result.batches += batches
            result.max_calls_per_forward = max(result.max_calls_per_forward, calls)
        merged[name] = result
    return merged
