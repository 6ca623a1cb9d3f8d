"""What recalibrate, audit and adapt measure: the statistics of the mode they are asked for.

``mode="train"``: one pass (:func:`bnstats.torch._pass.measure_pass`), the BN layers
normalizing with each batch's statistics. ``mode="eval"``: every layer's input as eval-mode
inference gives it, by whole-model eval passes until they stop moving (three where the data
run as one batch, :mod:`bnstats.torch._one_batch`; four where they converge fast;
:func:`measure_eval_mode`); ``mode="eval_exact"``: the same statistics level by level, one
pass per depth level of the BN layers (:mod:`bnstats.torch._eval_exact`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

from torch import nn

from bnstats.torch._eval_exact import measure_eval_exact, reusable_batches_first
from bnstats.torch._eval_statistics import (
    EVAL_TARGET,
    FirstBatches,
    buffer_statistics,
    converged,
    iterate_statistics,
    movement,
    statistics_of,
)
from bnstats.torch._layer_pass import Measured, raise_if_bad
from bnstats.torch._layers import display_name, find_batchnorm_layers, unwrap
from bnstats.torch._level import Level, Statistics
from bnstats.torch._one_batch import joined_if_fits, kept_batches, one_batch_statistics
from bnstats.torch._pass import Call, Check, call_record, measure_pass
from bnstats.torch._ranks import rank_count
from bnstats.torch._subset_choice import (
    late_subset_batches,
    sized_subset,
    subset_batches,
    subset_before_passes,
)
from bnstats.torch._subset_iteration import (
    Run,
    iterate_after_passes,
    iterate_from_subset,
    iterate_with_subset,
    whole_pass,
)
from bnstats.torch.options import PassOptions

EVAL_PASSES = 4
"""Passes of ``mode="eval"`` before it first judges convergence (:func:`measure_eval_mode`)."""


def measure(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    tool: str,
    check: Check | None = None,
    arguments: Mapping[str, Any] | None = None,
    precise: bool = True,
) -> Measured:
    """Every BN layer's population moments over all ranks' ``batches``, in ``options.mode``,
    and their precision unless ``precise=False`` (a tolerance needs it: given one, the
    precision is measured whatever ``precise`` says).

    In a group the ranks compare ``tool``, ``options`` as given and the tool's other
    ``arguments`` that change the result (adapt's ``prior``, say) before anything else."""
    call = {"tool": tool, **options.call(), **(arguments or {})}
    precise = precise or options.tolerance is not None
    if options.mode == "eval":
        return measure_eval_mode(model, batches, options, tool=call, check=check, precise=precise)
    if options.mode == "eval_exact":
        return measure_eval_exact(model, batches, options, tool=call, check=check, precise=precise)
    return measure_pass(model, batches, options, tool=call, check=check, precise=precise)


def measure_eval_mode(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    tool: Call,
    check: Check | None = None,
    precise: bool = True,
) -> Measured:
    """Every BN layer's population moments with every BN layer normalizing with its own
    final statistics (the fixed point of eval-mode inference), by whole-model passes.

    Every pass runs the whole model in eval mode (so data-dependent control flow goes where
    inference goes) and measures every BN layer's input (:class:`bnstats.torch._level.Level`):

    1. ``"batch"``: each layer normalizes with its batch's statistics, as in training: the
       start ``s0``;
    2. ``"fixed"`` at ``s0``: the populations ``F(s0)`` with every layer normalizing with ``s0``;
    3. ``"tracked"``: each batch runs at ``s0`` again, then with ``F(s0)`` moved as each
       layer's input moved from that run (exact where the change is affine per channel, as
       BN makes it): the estimate ``t``;
    4. ``"fixed"`` at ``t``: the populations ``F(t)``;

    (where the data's largest BN input, over all ranks, fits ``one_batch_bytes`` (by default
    :data:`~bnstats._one_batch.ONE_BATCH_BYTES`), passes 2-4 are one forward of all the
    data joined into one batch, each layer normalizing with its own input's population,
    then one fixed pass at its statistics, :mod:`bnstats.torch._one_batch`; else,
    on data of :data:`~bnstats.torch._subset_choice.SUBSET_SHARE` subsets or more,
    passes 2-4 are the subset iteration instead, :mod:`bnstats.torch._subset_iteration`:
    whole fixed passes corrected by passes over the first batches, until one converges or
    stops shrinking the movement; where that can be decided before any pass, batches with
    a length on every rank and no ``tolerance``, the subset is solved first and there is
    no batch-statistics pass: :func:`~bnstats.torch._subset_iteration.iterate_from_subset`,
    unless the subset's pass says all the data fit in one batch), then

    5. while the last pass moved some layer by more than :data:`EVAL_TARGET`
       (:func:`movement` of its result against the statistics it normalized with):
       ``"fixed"`` at the last pass's populations.

    The result is taken once a pass moved no layer by more than :data:`EVAL_TARGET`
    (``converged``). Each pass makes one more depth level of the BN layers exact (a layer's
    input depends only on the layers before it, exact in the pass before: after pass ``d``
    the first ``d`` levels are, up to rounding), so a model with ``D`` levels converges in
    at most ``D + 1`` passes (the last one moving nothing), often sooner. A model whose
    statistics depend on themselves (a BN layer fed by its own output) may never settle:
    after ``EVAL_PASSES`` passes and one per BN layer and one more, a warning, and it is
    measured level by level (:func:`~bnstats.torch._eval_exact.measure_eval_exact`).
    ``batches`` must be iterable again.

    A ``tolerance`` stop is judged on pass 1 (the later passes use the batches it drew); a
    converged result carries that pass as its ``judged`` (:class:`EvalMeasured`), so that
    the relative standard errors reported are the ones the stop judged (after the fallback,
    each layer's are those of the level it settled in, where that level's stop judged them).
    """
    check = reusable_batches_first(batches, check, "mode='eval'")  # refused on every rank
    keep = replace(options, unreached="keep")

    def run(level: Level, data: Any = batches, chosen: PassOptions = keep) -> Measured:
        return measure_pass(
            model, data, chosen, tool=tool, check=check, level=level, precise=precise
        )

    # Beyond the levels already exact an iterate can overflow (normalizing with a variance
    # far too small); the passes go on, and only the converged one is held to `nonfinite`.
    again = replace(keep, tolerance=None, nonfinite="skip")

    def again_run(level: Level, batches: Any) -> Measured:
        return run(level, batches, again)

    def first_run(level: Level, batches: Any) -> Measured:  # under the user's `unreached`
        return run(level, batches, replace(again, unreached=options.unreached))

    def alone_run(level: Level, batches: Any) -> Measured:  # this process's data alone
        return run(level, batches, replace(again, group=False))

    call = call_record(tool, options)
    runs = _Runs(run, again_run, first_run, alone_run)
    drawn = subset_before_passes(batches, options, call)
    if drawn is not None:
        final, estimate, start = _subset_first(model, runs, batches, drawn, options, call)
        data = FirstBatches(batches, len(start.batch_sizes))
    else:
        final, estimate, start, data = _batch_statistics_first(model, runs, batches, options, call)
    limit = final.passes + len(start.layers) + 1
    counts = final.subset_passes, final.subset_batches
    while not converged(final.moved) and final.passes < limit:
        estimate, passes = iterate_statistics(final, estimate), final.passes
        final = again_run(Level.fixed(estimate), data)
        final.passes, final.moved = passes + 1, movement(estimate, final)
    final.subset_passes, final.subset_batches = counts
    final.converged = converged(final.moved)
    if final.converged:
        raise_if_bad(final.first_bad, options)  # the passes before it skip whatever it says
        final.batch_sizes = start.batch_sizes
        final.check_coverage(options)
        return EvalMeasured(
            **{f.name: getattr(final, f.name) for f in fields(Measured) if f.init}, judged=start
        )
    worst = max(final.moved, key=lambda name: final.moved[name], default=None)
    warnings.warn(
        f"bnstats: mode='eval' did not converge in {final.passes} passes (the last pass moved "
        f"{display_name(worst) if worst is not None else 'no layer'} by "
        f"{final.moved.get(worst, math.inf):.3g}, more than {EVAL_TARGET:g}; more passes than "
        "BN layers: a layer's statistics depend on its own, or the batches differ from pass "
        "to pass, as with random augmentation or a shuffling loader cut by max_samples); "
        "measuring level by level instead (mode='eval_exact': one more pass per depth level "
        "of the BN layers)",
        stacklevel=4,
    )
    exact = measure_eval_exact(model, batches, options, tool=tool, check=check, precise=precise)
    exact.passes += final.passes
    exact.moved, exact.converged = final.moved, False
    exact.subset_passes, exact.subset_batches = final.subset_passes, final.subset_batches
    return exact


@dataclass(frozen=True)
class _Runs:
    """The passes of :func:`measure_eval_mode`: ``user(level, batches, options)`` with the
    options given; ``again`` (no tolerance, NaN skipped, unreached layers kept), ``first``
    (the same under the user's ``unreached``), ``alone`` (``again`` on this process's data
    alone, the one batch across ranks)."""

    user: Any
    again: Run
    first: Run
    alone: Run


def _subset_first(
    model: nn.Module,
    runs: _Runs,
    batches: Any,
    drawn: tuple[list[Any], float],
    options: PassOptions,
    call: Call,
) -> tuple[Measured, Statistics, Measured]:
    """Data of enough subsets whose size is known up front: the subset's batch-statistics
    pass, then all the data as one batch where they fit (:mod:`bnstats.torch._one_batch`),
    else the subset iteration from the subset's own fixed point. Returns the last whole pass,
    the statistics it normalized with, and whole pass 1 (``first``: the user's
    ``unreached``)."""
    subset, samples = drawn
    subset_start = runs.again(Level(training=False, rule="batch"), subset)
    scale = samples / max(sum(size or 0 for size in subset_start.batch_sizes), 1)
    own = iterate_statistics(subset_start, {})
    estimate = one_batch_statistics(runs.alone, batches, subset_start, scale, options, own, call)
    if estimate is not None:
        start = whole_pass(runs.first, batches, estimate, 2, 1, len(subset))
        return start, estimate, start
    layers = len(find_batchnorm_layers(unwrap(model)))
    join = partial(joined_if_fits, run_alone=runs.alone, options=options, call=call)
    size = partial(sized_subset, runs.again, batches, samples=samples, options=options, call=call)
    return iterate_from_subset(
        runs.again, runs.first, batches, subset, subset_start, layers + 2, join, size
    )


def _batch_statistics_first(
    model: nn.Module, runs: _Runs, batches: Any, options: PassOptions, call: Call
) -> tuple[Measured, Statistics, Measured, FirstBatches]:
    """Pass 1 with batch statistics over ``batches`` (where a ``tolerance`` stop is judged),
    then the one batch and its check pass where the data fit
    (:mod:`bnstats.torch._one_batch`), else passes 2-4 (:func:`_four_passes`; where they
    did not converge, the subset iteration's rounds with a late subset,
    :func:`iterate_after_passes`) or, on data of enough subsets, the subset iteration.
    Returns the last pass, the statistics it normalized with, pass 1, and the batches pass 1
    drew."""
    # a tolerance stop waits for every layer under unreached="raise"
    kept = kept_batches(batches, options)  # what pass 1 draws, for the one batch
    start = runs.user(Level(training=False, rule="batch"), kept, options)
    data = FirstBatches(batches, len(start.batch_sizes))
    start_statistics = statistics_of(start)
    estimate = one_batch_statistics(
        runs.alone, kept.kept, start, 1.0, options, start_statistics, call
    )
    kept.kept = None  # the inputs it held are not needed any more
    if estimate is not None:
        return whole_pass(runs.again, data, estimate, 3, 0, 0), estimate, start, data
    ranks = rank_count(options.group)
    count = subset_batches(start.batch_sizes, ranks)
    join = partial(joined_if_fits, run_alone=runs.alone, options=options, call=call)
    if count is None:
        final, estimate = _four_passes(model, runs.again, data, start_statistics)
        late = None if converged(final.moved) else late_subset_batches(start.batch_sizes, ranks)
        if late is not None:
            final, estimate = iterate_after_passes(
                runs.again,
                data,
                late,
                estimate,
                final,
                len(start.layers) + 2,
                join,
            )
    else:
        samples = sum(rows or 0 for rows in start.batch_sizes)
        size = partial(sized_subset, runs.again, data, samples=samples, options=options, call=call)
        final, estimate = iterate_with_subset(
            runs.again, data, count, start_statistics, len(start.layers) + 2, join, size
        )
    return final, estimate, start, data


def _four_passes(
    model: nn.Module, run: Run, data: Any, start: Statistics
) -> tuple[Measured, Statistics]:
    """Passes 2-4 of :func:`measure_eval_mode` from ``start``, the batch-statistics pass's
    populations: fixed at ``start``, tracked, fixed at the tracked estimate. Returns the last
    pass (``passes`` 4, ``moved`` set) and the statistics it normalized with."""
    base = run(Level.fixed(start), data)
    reference = {**buffer_statistics(model), **start}
    tracked = run(
        Level(
            training=False,
            rule="tracked",
            statistics=reference,
            base=iterate_statistics(base, start),
        ),
        data,
    )
    estimate = iterate_statistics(tracked, start)
    final = run(Level.fixed(estimate), data)
    final.passes, final.moved = EVAL_PASSES, movement(estimate, final)
    return final, estimate


@dataclass
class EvalMeasured(Measured):
    """What ``mode="eval"`` measured: its last pass (written), and ``judged``, its first
    pass, on which a ``tolerance`` stop was judged."""

    judged: Measured | None = None
