"""``mode="eval"`` on data many times larger than a few thousand samples: the fixed point of
eval-mode inference solved on the first batches, corrected by whole passes.

``F(s)`` is every BN layer's input population (mean, unbiased var) over all the data when
every BN layer normalizes with ``s``; eval mode looks for ``s* = F(s*)``. Passes over the
whole data make one depth level exact each, so deep chains need nearly one pass per level.
``F_sub``, the same over the subset (the first batches, :mod:`bnstats.torch._subset_choice`),
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
(:func:`bnstats.torch._measure.measure_eval_mode`). Data too small for a subset from the
start run four whole passes first; where those did not converge, the rounds go on from the
fourth with a late subset (:func:`iterate_after_passes`). Data that fit in one batch take
none of this (:mod:`bnstats.torch._one_batch`); where the subset fits, each solve of step 2
is one forward over the joined subset (:func:`_solve_on_subset`; across ranks, every rank
runs all ranks' subsets gathered and all take rank 0's statistics; a late subset is judged
by its first pass, :meth:`Subset.join_after`), and the subset is first sized to what the
budget takes joined (:func:`bnstats.torch._subset_choice.sized_subset`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bnstats._correction import SHRINK, ArrayMath, Correction
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
from bnstats.torch._level import Level, Statistics
from bnstats.torch._one_batch import JoinedForward
from bnstats.torch._subset_choice import Size

TORCH_MATH = ArrayMath(torch.where, lambda value, like: value.to(like))
"""Torch tensors as :class:`bnstats._correction.Correction` takes them."""

Join = Callable[[list[Any], Measured], JoinedForward | None]
"""``join(subset, measured)``: the subset's batches as one batch, with the forward that
solves it, where they fit in one by ``measured``, a pass over them
(:func:`bnstats.torch._one_batch.joined_if_fits`; across ranks all ranks' subsets on every
rank), else None."""


@dataclass
class Subset:
    """The subset's ``batches``, drawn once, and where they fit in one batch, ``joined``:
    then each solve is one forward (:func:`_solve_on_subset`). A subset sized to the budget
    (``_subset_choice.sized_subset``) keeps the batches it was sized from as ``fallback``:
    where its joined forward fails, the solves go over those by passes. A late subset is
    joined at its first pass (``join``, :meth:`join_after`)."""

    batches: list[Any]
    joined: JoinedForward | None = None
    fallback: list[Any] | None = None
    join: Join | None = None

    def join_after(self, measured: Measured) -> None:
        """Where the subset is still to be joined (``join`` set: a late subset, whose own
        size, over all ranks, is known from a pass over it only), ``joined`` judged by
        ``measured``, that pass."""
        if self.join is not None:
            self.joined, self.join = self.join(self.batches, measured), None


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
    whole data): the subset's batch statistics, the subset solve from them (no correction yet),
    then whole pass 1 at its solution (``first``: the pass whose options hold the user's
    ``unreached``), then rounds as in :func:`iterate_with_subset`; ``subset_start`` is the
    subset's batch-statistics pass over the ``drawn`` batches, which ``size`` sizes to the
    budget (``_subset_choice.sized_subset``; the sized subset's pass counted too). Returns the
    last whole pass, the statistics it normalized with, and whole pass 1."""
    subset, subset_start = _sized(drawn, subset_start, join, size)
    estimate, solve_passes, settled = _solve_on_subset(
        run, subset, iterate_statistics(subset_start, {}), Correction({}, {}, TORCH_MATH), {}, limit
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
    batches of ``data`` as the subset, sized by ``size`` (``_subset_choice.sized_subset``); subset
    solves of at most ``limit`` passes. Returns the last whole pass (``passes`` counting
    ``start``, ``moved``, ``subset_passes``, ``subset_batches`` set) and the statistics it
    normalized with."""
    drawn = list(FirstBatches(data, count))  # the same batches in every subset pass
    subset, subset_start = _sized(
        drawn, run(Level(training=False, rule="batch"), drawn), join, size
    )
    correct = Correction(iterate_statistics(subset_start, {}), start, TORCH_MATH)
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
    return Subset(batches, join(batches, subset_start), fallback), subset_start


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
        correct = Correction(iterate_statistics(at_estimate, estimate), whole, TORCH_MATH)
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
