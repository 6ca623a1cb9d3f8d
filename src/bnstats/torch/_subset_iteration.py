"""``mode="eval"`` on data many times larger than a few thousand samples: the fixed point of
eval-mode inference solved on the first batches, corrected by whole passes.

``F(s)`` is every BN layer's input population (mean, unbiased var) over all the data when
every BN layer normalizes with ``s``; eval mode looks for ``s* = F(s*)``. Passes over the
whole data make one depth level exact each, so deep chains need nearly one pass per level.
``F_sub``, the same over the subset (the first batches, :data:`SUBSET_SAMPLES` samples),
differs from ``F`` by sampling, and that difference changes little with ``s``. So, from the
train-mode start ``s0 = F_batch`` (or, where the subset is chosen before any whole pass,
:func:`iterate_from_subset`, from the subset's own fixed point, ``C`` the identity):

1. ``C``: per layer and channel the affine map taking the subset's populations to the whole
   data's, both measured with the same statistics (the batch-statistics rule for the first)::

       mean -> mean_w + a * (mean - mean_s),   var -> var * a**2,   a**2 = var_w / var_s

2. solve ``s = C(F_sub(s))`` by fixed passes over the subset only, until one moves no layer
   by more than a tenth of :data:`bnstats.torch._eval_statistics.EVAL_TARGET`;
3. one fixed pass over the whole data at that ``s``: ``F(s)``; converged when it moved no
   layer by more than the target (the same test as every eval-mode result); else ``C`` from
   ``F(s)`` and ``F_sub(s)`` (one more pass over the subset), and back to 2.

Each round shrinks the distance to ``s*`` by about the subset's relative sampling error of
how the layers respond to the statistics before them (about 0.1 at 1,024 samples on
the test models), not by one depth level; a round costs one whole pass and up to one
subset pass per depth level. A layer the subset never reaches takes the last whole pass's
statistics. The subset's batches are drawn once and kept, as the loader gives them (a
shuffling loader gives other first batches in every pass, and a subset that changes between
passes never settles; the whole passes see the same samples in another order, which eval
mode does not mind). Where a whole pass moved the statistics by more than half as much as
the one before (a chaotic model, where the subset's response is no guide to the whole
data's; the first round after the subset's own, uncorrected fixed point is not judged), or a
subset solve does not settle, plain fixed passes over the whole data take over
(:func:`bnstats.torch._measure.measure_eval_mode`). Data of fewer than :data:`SUBSET_SHARE`
subsets run four whole passes first; where those did not converge, the rounds go on from
the fourth with the first batches holding a sixteenth of the samples, or 64 samples, as the
subset (:func:`iterate_after_passes`, :func:`late_subset_batches`). Data that fit in one
batch take none of this (:mod:`bnstats.torch._one_batch`); where only the subset fits, each
solve of step 2 is one forward over the joined subset (:func:`_solve_on_subset`; across
ranks, every rank runs all ranks' subsets gathered and all take rank 0's statistics; a late
subset is judged by its first pass, :meth:`Subset.join_after`), and a subset drawn before
any whole pass is sized first
to what the budget takes joined: grown, at most a ``1 / LATE_MOST`` share of the data, or
shrunk, down to :data:`SHRUNK_LEAST` samples (:func:`sized_subset`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bnstats._one_batch import budget
from bnstats.torch import _eval_statistics
from bnstats.torch._eval_statistics import (
    FirstBatches,
    Run,
    converged,
    iterate_statistics,
    movement,
    statistics_movement,
)
from bnstats.torch._layer_pass import Measured
from bnstats.torch._layers import data_length, iterate_batches
from bnstats.torch._level import Level, MeanVar, Statistics
from bnstats.torch._one_batch import JoinedForward, joined_bytes
from bnstats.torch._pass import Call
from bnstats.torch._ranks import rank_count, resolve_group, run_and_exchange
from bnstats.torch.options import PassOptions

SUBSET_SAMPLES = 1024
"""Samples (over all ranks) in the subset: the first batches holding at least this many."""
SUBSET_BATCHES = 64
"""Batches (over all ranks) in the subset where the batch sizes are unknown."""
SUBSET_SHARE = 32
"""The subset iteration runs where the data hold at least this many subsets."""
LATE_SHARE = 16
"""Data of fewer than :data:`SUBSET_SHARE` subsets take the four whole passes first; where
those did not converge, the rounds go on with the first batches holding a ``1 / LATE_SHARE``
share of the data, or :data:`LATE_SUBSET_SAMPLES` where that is more, as the subset
(:func:`late_subset_batches`)."""
LATE_SUBSET_SAMPLES = 64
"""The fewest samples (over all ranks) of such a late subset."""
LATE_MOST = 8
"""A late subset is at most ``1 / LATE_MOST`` of the batches: on data too small for that the
whole passes go on alone (a subset of a quarter of the data cost more than it saved on
random-weight resnet18 and about as much on mobilenet_v2)."""
GROWN_LEAST = 1.5
"""A subset grows (:func:`sized_subset`) only where the budget takes at least this many
times its samples."""
SHRUNK_LEAST = 256
"""A subset that does not join within the budget shrinks to its first batches that do
(:func:`sized_subset`) only where those hold at least this many samples (a subset this
small converges more slowly)."""
SHRINK = 0.5
"""A round goes on only where its whole pass moved the statistics by less than this share of
what the round before moved them (else the subset is no guide: plain whole passes take over).
The first round after the subset's own fixed point is not judged: that point had no
correction, and how far its whole pass moved says nothing of how well the subset guides."""

Join = Callable[[list[Any], Measured, float], JoinedForward | None]
"""``join(subset, measured, scale)``: the subset's batches as one batch, with the forward
that solves it, where data of ``scale`` times the samples of the pass ``measured`` fit in
one (:func:`bnstats.torch._one_batch.joined_if_fits`; across ranks all ranks' subsets on
every rank), else None."""

Size = Callable[[list[Any], Measured], tuple[list[Any], Measured, list[Any] | None]]
"""``size(drawn, subset_start)``: the subset sized to the budget from the ``drawn`` batches
and their batch-statistics pass (:func:`sized_subset` with the data, their samples, the
options and the call bound): its batches, their batch-statistics pass, and ``drawn`` as the
fallback where sized (else None)."""


@dataclass
class Subset:
    """The subset's ``batches``, drawn once, and where they fit in one batch, ``joined``:
    then each solve is one forward (:func:`_solve_on_subset`). A subset sized to the budget
    (:func:`sized_subset`) keeps the batches it was sized from as ``fallback``: where its
    joined forward fails, the solves go over those by passes. A late subset is joined at
    its first pass (``join``, :meth:`join_after`)."""

    batches: list[Any]
    joined: JoinedForward | None = None
    fallback: list[Any] | None = None
    join: Join | None = None

    def join_after(self, measured: Measured) -> None:
        """Where the subset is still to be joined (``join`` set: a late subset, whose own
        size, over all ranks, is known from a pass over it only), ``joined`` judged by
        ``measured``, that pass."""
        if self.join is not None:
            self.joined, self.join = self.join(self.batches, measured, 1.0), None


def subset_batches(sizes: list[int | None], ranks: int) -> int | None:
    """Batches per rank in the subset of data whose batches (over all ``ranks``) had
    ``sizes``: enough for :data:`SUBSET_SAMPLES` samples together (at the mean batch size),
    or :data:`SUBSET_BATCHES` batches where a size is unknown; None where the data hold
    fewer than :data:`SUBSET_SHARE` subsets (eval mode's plain passes then cost less)."""
    if any(size is None for size in sizes):
        per_rank = max(1, math.ceil(SUBSET_BATCHES / ranks))
        return per_rank if len(sizes) >= SUBSET_SHARE * per_rank * ranks else None
    samples = sum(size or 0 for size in sizes)
    if not _holds_enough_subsets(samples):
        return None
    return _batches_per_rank(SUBSET_SAMPLES, samples, len(sizes), ranks)


def late_subset_batches(sizes: list[int | None], ranks: int) -> int | None:
    """Batches per rank in the late subset of data whose batches (over all ``ranks``) had
    ``sizes``: the first batches holding a ``1 / LATE_SHARE`` share of the samples or
    :data:`LATE_SUBSET_SAMPLES`, whichever is more (:data:`LATE_SHARE`); None where that is
    more than ``1 / LATE_MOST`` of the batches or a size is unknown."""
    if not sizes or any(size is None for size in sizes):
        return None
    samples = sum(size or 0 for size in sizes)
    wanted = max(samples / LATE_SHARE, LATE_SUBSET_SAMPLES)
    count = _batches_per_rank(wanted, samples, len(sizes), ranks)
    return count if count * ranks * LATE_MOST <= len(sizes) else None


def _batches_per_rank(wanted: float, samples: int, batches: int, ranks: int) -> int:
    """The first batches on each of ``ranks`` that together hold ``wanted`` samples, at the
    mean size of ``batches`` batches holding ``samples``: at least one."""
    return max(1, math.ceil(wanted / ranks / (samples / batches)))


class Correction:
    """Per layer, the affine map per channel from the subset's populations to the whole
    data's, both measured normalizing with the same statistics (see the module)."""

    def __init__(self, subset: Statistics, whole: Statistics) -> None:
        self.maps: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, (mean_w, var_w) in whole.items():
            if name not in subset:
                continue
            mean_s, var_s = (v.to(mean_w) for v in subset[name])
            spread = var_s > 0
            squared = torch.where(spread, var_w / torch.where(spread, var_s, 1.0), 1.0)
            self.maps[name] = (mean_s, mean_w, var_w, squared, spread)

    def __call__(self, statistics: Statistics) -> Statistics:
        """``statistics`` mapped, layer by layer (:meth:`layer`)."""
        return {name: self.layer(name, value) for name, value in statistics.items()}

    def layer(self, name: str, statistics: MeanVar) -> MeanVar:
        """Layer ``name``'s ``(mean, var)`` mapped; as it is without a map. A channel
        constant over the subset (``var_s = 0``) is shifted: ``var -> var + var_w``."""
        if name not in self.maps:
            return statistics
        mean_s, mean_w, var_w, squared, spread = self.maps[name]
        mean, var = (v.to(mean_w) for v in statistics)
        return (
            mean_w + squared.sqrt() * (mean - mean_s),
            torch.where(spread, var * squared, var + var_w),
        )


def subset_before_passes(
    batches: Any, options: PassOptions, call: Call
) -> tuple[list[Any], float] | None:
    """The subset, drawn before any whole pass, and the data's samples over all ranks
    (estimated from the first batches' mean size), where that can be decided up front: no
    ``tolerance``, on every rank ``batches`` with a length, and (at the first batches' mean
    size, within ``max_samples``) at least :data:`SUBSET_SHARE` subsets of data over all
    ranks; None otherwise (then the batch-statistics pass comes first,
    :func:`iterate_with_subset`). In a group every rank draws its first batches holding its
    share of the subset's samples, and one status exchange (``call`` compared; a rank's
    failure raised on every rank) gives every rank the same decision."""
    group = resolve_group(options.group)
    ranks = rank_count(options.group)

    def draw() -> tuple[list[Any] | None, float | None]:
        return _draw_subset(batches, options, SUBSET_SAMPLES / ranks)

    if group is None:
        subset, total = draw()
        totals = [total]
    else:
        subset, totals = run_and_exchange(group, draw, dict(call))
    if any(total is None for total in totals):
        return None
    samples = sum(totals)
    return (subset, samples) if _holds_enough_subsets(samples) else None


def _draw_subset(
    batches: Any, options: PassOptions, samples_wanted: float
) -> tuple[list[Any] | None, float | None]:
    """This process's first batches holding ``samples_wanted`` samples, and its data's size
    in samples estimated from their mean size (within ``max_samples``); ``(None, None)``
    under a ``tolerance``, without a length, with a batch of unknown size, or no batch."""
    count = data_length(batches)
    if options.tolerance is not None or count is None:
        return None, None
    first = _first_batches(batches, options.max_samples, samples_wanted)
    if first is None:
        return None, None
    subset, samples = first
    return subset, min(count * samples / len(subset), options.max_samples or math.inf)


def _first_batches(
    batches: Any, max_samples: int | None, samples_wanted: float
) -> tuple[list[Any], int] | None:
    """The first of ``batches`` (within ``max_samples``) holding ``samples_wanted`` samples
    (drawing stops within a batch past them), and the samples they hold; None with a batch
    of unknown size, or no batch."""
    subset: list[Any] = []
    samples = 0
    for batch, size in iterate_batches(batches, max_samples):
        if size is None:
            return None
        subset.append(batch)
        samples += size
        if samples >= samples_wanted:
            break
    return (subset, samples) if subset else None


def _holds_enough_subsets(samples: float) -> bool:
    """True where data of ``samples`` samples (over all ranks) hold :data:`SUBSET_SHARE`
    subsets: the subset iteration then costs less than eval mode's plain passes."""
    return samples >= SUBSET_SHARE * SUBSET_SAMPLES


def sized_subset(
    run: Run,
    batches: Any,
    drawn: list[Any],
    subset_start: Measured,
    samples: float,
    options: PassOptions,
    call: Call,
) -> tuple[list[Any], Measured, list[Any] | None]:
    """The subset for :func:`iterate_from_subset`, sized to the one-batch budget, so that each
    round's solve is one forward: where the ``drawn`` batches (their batch-statistics pass
    ``subset_start``, over all ranks) join within the budget, the first batches holding as
    many samples as the budget takes joined, at most a ``1 / LATE_MOST`` share of the data's
    ``samples`` (where that is :data:`GROWN_LEAST` times the subset or more: the subset's
    sampling error, which sets how much a round shrinks the distance, is smaller; trained
    mobilenet_v2 on 32,768 digits: 6 whole passes at 1,024 samples, 4 at 2,720); where they
    do not join, their first batches that do, where those hold at least
    :data:`SHRUNK_LEAST` samples (the subset passes of a solve become one forward: conv
    chain 4 + 122 passes at 1,024 samples, 4 + 9 at 496). Each with its own batch-statistics
    pass (one more subset pass) and ``drawn`` as the fallback; else ``drawn`` as it is
    (fallback None). Across ranks each rank draws its share, and one status exchange
    (``call`` compared) sizes the subset only where every rank's changed."""
    unchanged = drawn, subset_start, None
    held = sum(size or 0 for size in subset_start.batch_sizes)
    largest = joined_bytes(subset_start)
    if not largest or not held:
        return unchanged
    batch = held / len(subset_start.batch_sizes)  # drawing stops within a batch past it
    fitting = held * budget(options.one_batch_bytes) / largest - batch
    if fitting < held:  # shrunk: the first of the drawn batches
        source, wanted, step = drawn, fitting, "subset: shrink"
        if wanted < SHRUNK_LEAST:
            return unchanged
    else:  # grown: the first batches of the data
        source, wanted, step = batches, min(fitting, samples / LATE_MOST), "subset: grow"
        if wanted < GROWN_LEAST * held:
            return unchanged

    def draw() -> tuple[list[Any] | None, bool]:
        first = _first_batches(source, options.max_samples, wanted / rank_count(options.group))
        changed = first is not None and len(first[0]) != len(drawn)
        return (first[0] if first is not None and changed else None), changed

    group = resolve_group(options.group)
    if group is None:
        sized, changed = draw()
        every = [changed]
    else:
        sized, every = run_and_exchange(group, draw, {**call, "step": step})
    if sized is None or not all(every):
        return unchanged
    return sized, run(Level(training=False, rule="batch"), sized), drawn


def iterate_from_subset(
    run: Run,
    first: Run,
    batches: Any,
    drawn: list[Any],
    subset_start: Measured,
    limit: int,
    join: Join,
    size: Size,
) -> tuple[Measured, Statistics, Measured]:
    """The subset iteration with the subset solved first (no batch-statistics pass over the
    whole data): the subset's batch statistics, the subset solve from them (no correction
    yet), then whole pass 1 at its solution (``first``: the pass whose options hold the
    user's ``unreached``), then rounds as in :func:`iterate_with_subset`; ``subset_start``
    is the subset's batch-statistics pass over the ``drawn`` batches, which ``size`` sizes
    to the budget (:func:`sized_subset`; the sized subset's pass counted too). Returns the
    last whole pass, the statistics it normalized with, and whole pass 1."""
    subset, subset_start = _sized(drawn, subset_start, join, size)
    estimate, solve_passes, settled = _solve_on_subset(
        run, subset, iterate_statistics(subset_start, {}), Correction({}, {}), {}, limit
    )
    before = _subset_passes_before(subset)
    count = len(subset_start.batch_sizes)
    start = whole_pass(first, batches, estimate, 1, before + solve_passes, count)
    data = FirstBatches(batches, len(start.batch_sizes))
    if not settled or converged(start.moved):
        return start, estimate, start
    # ``start`` normalized with an estimate no whole pass corrected: the next round, the first
    # with a correction, has no movement of a corrected round to shrink
    final, estimate = _rounds(run, data, subset, estimate, start, limit, math.inf)
    return final, estimate, start


def iterate_with_subset(
    run: Run, data: Any, count: int, start: Statistics, limit: int, join: Join, size: Size
) -> tuple[Measured, Statistics]:
    """The subset iteration (module docstring) from ``start``, the populations of the
    batch-statistics pass over ``data`` (counted as its first pass), with the first ``count``
    batches of ``data`` as the subset, sized by ``size`` (:func:`sized_subset`); subset
    solves of at most ``limit`` passes. Returns the last whole pass (``passes`` counting
    ``start``, ``moved``, ``subset_passes``, ``subset_batches`` set) and the statistics it
    normalized with."""
    drawn = list(FirstBatches(data, count))  # the same batches in every subset pass
    subset, subset_start = _sized(
        drawn, run(Level(training=False, rule="batch"), drawn), join, size
    )
    correct = Correction(iterate_statistics(subset_start, {}), start)
    estimate, solve_passes, settled = _solve_on_subset(run, subset, start, correct, start, limit)
    before, count = _subset_passes_before(subset), len(subset_start.batch_sizes)
    final = whole_pass(run, data, estimate, 2, before + solve_passes, count)
    if not settled or converged(final.moved):
        return final, estimate
    moved = max(final.moved.values(), default=math.inf)
    return _rounds(run, data, subset, estimate, final, limit, moved)


def _sized(
    drawn: list[Any], subset_start: Measured, join: Join, size: Size
) -> tuple[Subset, Measured]:
    """The subset of the ``drawn`` batches (their batch-statistics pass ``subset_start``)
    sized to the budget by ``size``, joined where it fits (``join``), and its own
    batch-statistics pass."""
    batches, subset_start, fallback = size(drawn, subset_start)
    return Subset(batches, join(batches, subset_start, 1.0), fallback), subset_start


def _subset_passes_before(subset: Subset) -> int:
    """The subset passes before its first solve: its batch-statistics pass, and that of the
    batches it was sized from (``fallback``) where sized."""
    return 1 if subset.fallback is None else 2


def iterate_after_passes(
    run: Run, data: Any, count: int, estimate: Statistics, last: Measured, limit: int, join: Join
) -> tuple[Measured, Statistics]:
    """The rounds of the subset iteration after whole passes that did not converge: ``last``
    the last of them (``passes`` and ``moved`` set), which normalized with ``estimate``; the
    first ``count`` batches of ``data`` as the subset. The first round is judged against how
    far ``last`` moved the statistics (its correction is measured at ``estimate``, unlike a
    subset's own fixed point's). Returns as :func:`iterate_with_subset`."""
    drawn = list(FirstBatches(data, count))  # the same batches in every subset pass
    subset = Subset(drawn, join=join)  # joined once the first round's pass over it measured it
    return _rounds(run, data, subset, estimate, last, limit, max(last.moved.values()))


def _rounds(
    run: Run,
    data: Any,
    subset: Subset,
    estimate: Statistics,
    last: Measured,
    limit: int,
    last_moved: float,
) -> tuple[Measured, Statistics]:
    """Rounds after the whole pass ``last`` (``passes``, ``moved``, ``subset_passes`` set) at
    ``estimate``: ``C`` measured at ``estimate``, the subset solve, a whole pass; until one
    converges, moves the statistics by :data:`SHRINK` or more of what the round before moved
    them (the first: ``last_moved``), or a solve does not settle."""
    final = last
    while True:
        whole = iterate_statistics(final, estimate)
        at_estimate = run(Level.fixed(estimate), subset.batches)
        subset.join_after(at_estimate)
        correct = Correction(iterate_statistics(at_estimate, estimate), whole)
        estimate, solve_passes, settled = _solve_on_subset(
            run, subset, estimate, correct, whole, limit
        )
        subset_passes = final.subset_passes + 1 + solve_passes
        final = whole_pass(
            run, data, estimate, final.passes + 1, subset_passes, len(at_estimate.batch_sizes)
        )
        moved = max(final.moved.values(), default=math.inf)
        if not settled or converged(final.moved) or not moved < SHRINK * last_moved:
            return final, estimate
        last_moved = moved


def whole_pass(
    run: Run,
    data: Any,
    estimate: Statistics,
    passes: int,
    subset_passes: int,
    subset_batches: int,
) -> Measured:
    """A fixed pass over all of ``data`` at ``estimate``, carrying the counts so far: its
    ``passes``, how far it ``moved``, ``subset_passes`` and ``subset_batches`` (over all
    ranks)."""
    whole = run(Level.fixed(estimate), data)
    whole.passes, whole.moved = passes, movement(estimate, whole)
    whole.subset_passes, whole.subset_batches = subset_passes, subset_batches
    return whole


def _solve_on_subset(
    run: Run,
    subset: Subset,
    estimate: Statistics,
    correct: Correction,
    whole: Statistics,
    limit: int,
) -> tuple[Statistics, int, bool]:
    """``s = C(F_sub(s))`` from ``estimate`` (layers the subset does not reach: ``whole``'s
    statistics): the solution, the passes it took, and whether it settled. Where the subset
    is ``joined``, one forward over it with each BN layer normalizing each call with ``C``
    of its own input's population (``Level(rule="own")``: every layer is solved when the
    forward reaches it, as in :mod:`bnstats.torch._one_batch`); else fixed passes over its
    batches until one moves no layer by more than a tenth of the eval-mode target, at most
    ``limit`` passes."""
    if subset.joined is not None:
        level = Level(training=False, rule="own", correction=correct.layer)
        solution = subset.joined.solve(
            level, lambda measured: {**whole, **correct(iterate_statistics(measured, estimate))}
        )
        if solution is not None:
            return {**estimate, **solution}, 1, True
        subset.joined = None  # the forward failed: passes over the subset from now on
        subset.batches = subset.fallback or subset.batches
    target = _eval_statistics.EVAL_TARGET / 10
    for passes in range(1, limit + 1):
        measured = run(Level.fixed(estimate), subset.batches)
        moved_to = {**whole, **correct(iterate_statistics(measured, estimate))}
        eps = {name: float(m.layer.eps) for name, m in measured.layers.items()}
        moved = statistics_movement(estimate, _common(moved_to, estimate), eps)
        estimate = {**estimate, **moved_to}
        if converged(moved, target):
            return estimate, passes, True
    return estimate, limit, False


def _common(statistics: Statistics, reference: Statistics) -> Statistics:
    """The layers of ``statistics`` that ``reference`` also holds."""
    return {name: value for name, value in statistics.items() if name in reference}
