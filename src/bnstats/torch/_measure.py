"""What recalibrate, audit and adapt measure: the statistics of the mode they are asked for.

``mode="train"``: one pass (:func:`bnstats.torch._pass.measure_pass`), the BN layers
normalizing with each batch's statistics. ``mode="eval"``: every layer's input as eval-mode
inference gives it, by whole-model eval passes until they stop moving (four where they
converge fast; :func:`measure_eval_mode`); ``mode="eval_exact"``: the same statistics level
by level, one pass per depth level of the BN layers (:func:`measure_eval_exact`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

from torch import nn

from bnstats._levels import (
    Pending,
    require_reusable,
    require_standstill,
    settle_level,
    settle_next,
)
from bnstats.torch._eval_statistics import (
    EVAL_TARGET,
    FirstBatches,
    buffer_statistics,
    converged,
    iterate_statistics,
    movement,
    statistics_of,
)
from bnstats.torch._layer_pass import LayerPass, Measured, raise_if_bad
from bnstats.torch._layers import display_name, find_batchnorm_layers, unwrap
from bnstats.torch._level import MISS_PROBABILITY, Level, Statistics
from bnstats.torch._pass import Call, Check, call_record, measure_pass
from bnstats.torch._ranks import rank_count
from bnstats.torch._subset_iteration import (
    Run,
    iterate_after_passes,
    iterate_from_subset,
    iterate_with_subset,
    late_subset_batches,
    subset_batches,
    subset_before_passes,
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

    (on data of :data:`~bnstats.torch._subset_iteration.SUBSET_SHARE` subsets or more,
    passes 2-4 are the subset iteration instead, :mod:`bnstats.torch._subset_iteration`:
    whole fixed passes corrected by passes over the first batches, until one converges or
    stops shrinking the movement; where that can be decided before any pass, batches with
    a length on every rank and no ``tolerance``, the subset is solved first and there is
    no batch-statistics pass: :func:`~bnstats.torch._subset_iteration.iterate_from_subset`),
    then

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
    measured level by level (:func:`measure_eval_exact`). ``batches`` must be iterable
    again.

    A ``tolerance`` stop is judged on pass 1 (the later passes use the batches it drew); a
    converged result carries that pass as its ``judged`` (:class:`EvalMeasured`), so that
    the relative standard errors reported are the ones the stop judged (after the fallback,
    each layer's are those of the level it settled in, where that level's stop judged them).
    """
    check = _reusable_batches_first(batches, check, "mode='eval'")  # refused on every rank
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

    drawn = subset_before_passes(batches, options, call_record(tool, options))
    if drawn is not None:
        layers = len(find_batchnorm_layers(unwrap(model)))
        final, estimate, start = iterate_from_subset(
            again_run, first_run, batches, drawn, layers + 2
        )
        data = FirstBatches(batches, len(start.batch_sizes))
    else:
        final, estimate, start, data = _batch_statistics_first(
            model, run, again_run, batches, options
        )
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


def _batch_statistics_first(
    model: nn.Module, run: Any, again_run: Run, batches: Any, options: PassOptions
) -> tuple[Measured, Statistics, Measured, FirstBatches]:
    """Pass 1 with batch statistics over ``batches`` (where a ``tolerance`` stop is judged),
    then passes 2-4 (:func:`_four_passes`; where they did not converge, the subset
    iteration's rounds with a late subset, :func:`iterate_after_passes`) or, on data of
    enough subsets, the subset iteration. Returns the last pass, the statistics it
    normalized with, pass 1, and the batches pass 1 drew."""
    # a tolerance stop waits for every layer under unreached="raise"
    start = run(Level(training=False, rule="batch"), batches, options)
    data = FirstBatches(batches, len(start.batch_sizes))
    start_statistics = statistics_of(start)
    ranks = rank_count(options.group)
    count = subset_batches(start.batch_sizes, ranks)
    if count is None:
        final, estimate = _four_passes(model, again_run, data, start_statistics)
        late = None if converged(final.moved) else late_subset_batches(start.batch_sizes, ranks)
        if late is not None:
            final, estimate = iterate_after_passes(
                again_run, data, late, estimate, final, len(start.layers) + 2
            )
    else:
        final, estimate = iterate_with_subset(
            again_run, data, count, start_statistics, len(start.layers) + 2
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


def measure_eval_exact(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    tool: Call,
    check: Check | None = None,
    precise: bool = True,
) -> Measured:
    """Every BN layer's population moments with every BN layer before it normalizing with
    its own final statistics: the fixed point of eval-mode inference, exactly.

    Level by level (:class:`bnstats.torch._level.Level`): each pass runs the model in eval
    mode; the layers already settled normalize with their population ``mean`` and unbiased
    ``var``, every other BN layer is measured and outputs NaN. A layer whose input was finite
    in every batch depends on settled layers only: its measurement is exact and it settles.
    A layer that saw NaN in every batch is computed from an unsettled one and waits for the
    next level. So the cost is one pass over ``batches`` per depth level of the BN layers
    (the longest chain of BN layers one after another; layers side by side, a residual
    block's shortcut BN beside its branch, settle in the same pass), never more than the
    number of BN layers. ``batches`` must be iterable again at each level (a list, a
    DataLoader). Any batch size works, one included: eval mode needs no batch statistics.

    A layer with NaN or Inf in some batches but not all received it from the data: it fails
    the pass (``nonfinite="raise"``) or settles without those batches (``"skip"``). The data
    flow is what is tracked: a layer is taken as independent of an unsettled one when no NaN
    from it arrives (an input chosen by ``argmax`` of one, say, is not seen as dependent).
    In a group every rank makes the same levels: the decisions use the merged counts.

    NaN shows dependence only where it passes (``sign``, ``nan_to_num``, comparisons and
    ``argmax`` stop it), so a last pass checks the result: every layer normalizing with the
    statistics measured, none may move by more than :data:`EVAL_TARGET` (or the
    ``tolerance``); else ``ValueError`` naming the layer (:func:`_require_standstill`).
    """
    check = _reusable_batches_first(batches, check, "mode='eval_exact'")  # on every rank
    level_options = replace(options, nonfinite="skip", unreached="keep")
    settled: dict[str, LayerPass] = {}
    skipped: dict[str, int] = {}
    first: Measured | None = None
    sizes: list[int | None] = []
    passes = 0
    while True:
        final = {name: moments.population for name, moments in settled.items()}
        budget = level_miss_budget(passes + 1)
        if first is None:  # a tolerance stop waits for every layer under unreached="raise"
            level = Level(False, miss_budget=budget)
            kept = replace(level_options, unreached=options.unreached)
        else:  # and then for those the first level reached
            reached = frozenset(first.layers) - set(first.unreached)
            level = Level(False, settled=final, awaited=reached, miss_budget=budget)
            kept = level_options
        measured = measure_pass(
            model, batches, kept, tool=tool, check=check, level=level, precise=precise
        )
        passes += 1
        sizes = max(sizes, measured.batch_sizes, key=len)
        if first is None:
            first = measured
            _refuse_new_layers(model, first)
            first.check_coverage(options)
        if settle_next(
            measured.layers,
            settled,
            first.layers,
            first.unreached,
            partial(_settle_level, measured=measured, options=options, skipped=skipped),
        ):
            break
    layers = {name: settled.get(name, moments) for name, moments in first.layers.items()}
    result = Measured(
        layers,
        sizes,
        unreached=first.unreached,
        fixed=first.fixed,
        skipped=skipped,
        passes=passes + 1,
    )
    measured_statistics = statistics_of(result)
    check_pass = measure_pass(
        model,
        FirstBatches(batches, len(sizes)),
        replace(level_options, tolerance=None),
        tool=tool,
        check=check,
        level=Level.fixed(measured_statistics),
        precise=precise,
    )
    _require_standstill(movement(measured_statistics, check_pass), options)
    return result


def level_miss_budget(level: int) -> float:
    """The share of :data:`MISS_PROBABILITY` the ``tolerance`` stop of level ``level`` (from
    1) of ``mode="eval_exact"`` allows, each level stopping on its own layers::

        MISS_PROBABILITY * 6 / (pi**2 * level**2)

    summing to at most :data:`MISS_PROBABILITY` over any number of levels (the sum of
    ``1 / k**2`` is ``pi**2 / 6``), so every channel of every level is within the tolerance
    with 95 % confidence together."""
    return MISS_PROBABILITY * 6 / (math.pi**2 * level**2)


def _require_standstill(moved: Mapping[str, float], options: PassOptions) -> None:
    """``ValueError`` when the check pass of ``mode="eval_exact"`` (every layer normalizing
    with the statistics measured level by level) moved some layer by more than
    :data:`EVAL_TARGET`: a dependence the NaN did not show. Where a ``tolerance`` stopped
    the levels early, the check pass draws as many batches as the longest level, so each
    layer's two measurements differ by their sampling errors, each within the tolerance:
    the limit is then twice the tolerance."""
    limit = max(EVAL_TARGET, 2 * (options.tolerance or 0.0))
    remedy = "pass mode='eval', which repeats passes until the statistics stop moving"
    require_standstill(moved, limit, "mode='eval_exact'", display_name, remedy)


def _refuse_new_layers(model: nn.Module, first: Measured) -> None:
    """Level by level needs the same BN layers in every pass: one made by a forward (``self.bn
    = nn.BatchNorm1d(4)`` on the first call) ran on the first level's NaN; its buffers are
    reset to a fresh layer's and the pass fails, naming it."""
    new = {
        name: layer
        for name, layer in find_batchnorm_layers(unwrap(model)).items()
        if name not in first.layers
    }
    if not new:
        return
    for layer in new.values():
        layer.reset_running_stats()
    names = ", ".join(map(display_name, new))
    raise ValueError(
        f"mode='eval_exact': BN layer(s) {names} were created during a forward of the pass; "
        "level by level needs every BN layer to exist before it (run one forward first), or "
        "pass mode='eval', which measures such layers; nothing was written"
    )


def require_reusable_batches(batches: Any, who: str, argument: str = "batches") -> None:
    """:func:`bnstats._levels.require_reusable` worded for torch's tools (a list or a
    DataLoader can be gone over again)."""
    require_reusable(batches, who=who, argument=argument, examples="a list, a DataLoader")


def _reusable_batches_first(batches: Any, check: Check | None, who: str) -> Check:
    """``check``, after refusing a one-shot iterator for ``batches``."""

    def checked(model: nn.Module) -> None:
        require_reusable_batches(batches, who)
        if check is not None:
            check(model)

    return checked


def _settle_level(
    pending: list[LayerPass], measured: Measured, options: PassOptions, skipped: dict[str, int]
) -> list[LayerPass]:
    """The layers of this level (:func:`bnstats._levels.settle_level`); the batches left out
    for NaN or Inf (``nonfinite="skip"``) are counted into ``skipped``."""
    entries = [
        Pending(
            m,
            m.label,
            display_name(m.name),
            m.batches,
            measured.skipped.get(m.name, 0),
            m.max_calls_per_forward,
        )
        for m in pending
    ]
    ready = settle_level(entries, options.nonfinite, "mode='eval_exact'")
    skipped.update({entry.layer.name: entry.bad for entry in ready if entry.bad})
    return [entry.layer for entry in ready]
