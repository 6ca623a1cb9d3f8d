"""Eval mode over data larger than the one-batch budget, for the Keras and Flax tools: the
fixed point solved on the first batches, corrected by whole passes.

``F(s)`` is every BN layer's input population over all the data when every BN layer
normalizes with ``s``; eval mode looks for ``s* = F(s*)``. Level by level that takes one
pass per depth level. Here the *subset*, the first batches of the data that join within the
budget (:func:`bnstats._host_one_batch.subset_within`), runs as one batch:

1. one forward over the subset, every BN layer normalizing with its own input's population
   (as the one batch does, :mod:`bnstats._host_one_batch`): ``s``, the subset's own fixed
   point, and one fixed pass over all the data at ``s``: ``F(s)``;
2. while that pass moved a layer by more than :data:`bnstats._host_levels.CHECK_TARGET`, a
   round: one fixed forward over the subset at ``s`` (``F_sub(s)``), the correction ``C``
   from it to ``F(s)`` (:class:`bnstats._correction.Correction`), one forward over the
   subset with every layer normalizing with ``C`` of its own input's population (the
   solution of ``s = C(F_sub(s))``), and one fixed pass over all the data at that ``s``.

The last whole pass is the result, as the one batch's check pass is: it moved no layer by
more than the target. Each round shrinks the distance to ``s*`` by about the subset's
sampling error of how the layers respond to the statistics before them, not by one depth
level. Where a round's whole pass moved the statistics by :data:`bnstats._correction.SHRINK`
or more of what the round before moved them (the first corrected round is not judged), a
subset forward fails or leaves a layer unreached or not finite, or a whole pass leaves a
batch out (NaN or Inf, which the levels report), the call goes on level by level from its
first pass: the passes spent here are counted, and no number comes from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnstats._correction import SHRINK, ArrayMath, Correction
from bnstats._host_levels import CHECK_TARGET, movements
from bnstats._host_pass import Final, HostMeasured
from bnstats.stats import NonFiniteStatisticsError

NUMPY_MATH = ArrayMath(np.where, lambda value, like: np.asarray(value, like.dtype))
"""The host's float64 statistics as :class:`bnstats._correction.Correction` takes them."""

JoinedRun = Callable[[Any, Final | None, Correction | None], HostMeasured]
"""``run_joined(joined, final, correction)``: one pass over the one batch ``joined``, flushed,
under ``nonfinite="skip"`` and ``unreached="keep"``: with ``final``, every BN layer
normalizing with those statistics and measured; else every BN layer normalizing with its
input's own population (``mean``, ``m2 / N``), mapped by ``correction.maps[name]`` where
given (:class:`bnstats._correction.LayerMap`, converted to the framework's arrays)."""

WholeRun = Callable[[Final], HostMeasured]
"""``run_whole(final)``: one pass over all the data, every BN layer normalizing with
``final`` and measured (``nonfinite="skip"``, ``unreached="keep"``)."""


@dataclass
class Spent:
    """The passes the subset iteration ran: over all the data (``whole``) and forwards over
    the joined subset (``subset``)."""

    whole: int = 0
    subset: int = 0


def iterate_on_subset(
    first: HostMeasured,
    joined: Any,
    run_whole: WholeRun,
    run_joined: JoinedRun,
    epsilons: Mapping[str, float],
    spent: Spent,
) -> HostMeasured | None:
    """The rounds of the module from ``first`` (the call's first pass) over the subset
    ``joined``: the last whole pass's measurements (``passes`` counting ``first``,
    ``subset_passes``), or None where the levels are to go on (the passes run are in
    ``spent``)."""
    reached = [host.name for host in first.reached()]
    estimate = _joined(run_joined, joined, None, None, reached, spent)
    if estimate is None:
        return None
    whole = _whole(run_whole, estimate, reached, epsilons, spent)
    last = math.inf  # the first corrected round is not judged
    while whole is not None and whole.moved > CHECK_TARGET:
        at_estimate = _joined(run_joined, joined, estimate, None, reached, spent)
        if at_estimate is None:
            return None
        correct = Correction(at_estimate, whole.statistics, NUMPY_MATH)
        solved = _joined(run_joined, joined, None, correct, reached, spent)
        if solved is None:
            return None
        estimate = correct(solved)  # what each layer normalized with in that forward
        whole = _whole(run_whole, estimate, reached, epsilons, spent)
        if whole is None or (whole.moved > CHECK_TARGET and not whole.moved < SHRINK * last):
            return None
        last = whole.moved
    if whole is None:
        return None
    layers = {name: whole.measured.layers[name] for name in first.layers}
    return HostMeasured(
        layers,
        whole.measured.batch_sizes,
        unreached=first.unreached,
        passes=1 + spent.whole,
        subset_passes=spent.subset,
    )


def _joined(
    run_joined: JoinedRun,
    joined: Any,
    final: Final | None,
    correction: Correction | None,
    reached: list[str],
    spent: Spent,
) -> Final | None:
    """One forward over the subset, counted in ``spent`` (:func:`joined_statistics`)."""
    spent.subset += 1
    return joined_statistics(run_joined, joined, final, correction, reached)


def joined_statistics(
    run_joined: JoinedRun,
    joined: Any,
    final: Final | None,
    correction: Correction | None,
    reached: list[str],
) -> Final | None:
    """The ``reached`` layers' statistics from one forward over a joined batch (eval mode's
    one batch or subset, :data:`JoinedRun`); None where it failed (a model written for one
    batch size, memory short: the forward changes nothing), or left a layer unreached or not
    finite."""
    try:
        measured = run_joined(joined, final, correction)
    except Exception:  # noqa: BLE001 (a shortcut; the levels still run)
        return None
    return _statistics(measured, reached)


@dataclass
class _Whole:
    """A fixed pass over all the data: what it ``measured``, every reached layer's
    ``statistics`` and how far it ``moved`` them (the worst layer)."""

    measured: HostMeasured
    statistics: Final
    moved: float


def _whole(
    run_whole: WholeRun,
    estimate: Final,
    reached: list[str],
    epsilons: Mapping[str, float],
    spent: Spent,
) -> _Whole | None:
    """One fixed pass over all the data at ``estimate`` and how far it moved the statistics
    (:func:`bnstats._host_levels.movements`); None where it left a layer unreached or a
    batch out, or the movement is not finite."""
    spent.whole += 1
    measured = run_whole(estimate)
    statistics = _statistics(measured, reached)
    if statistics is None:
        return None
    moved = max(movements(estimate, measured, epsilons).values(), default=0.0)
    return _Whole(measured, statistics, moved) if math.isfinite(moved) else None


def _statistics(measured: HostMeasured, reached: list[str]) -> Final | None:
    """Every ``reached`` layer's ``(mean, var)`` in ``measured``; None where one had no
    batch, left one out (NaN or Inf) or is not finite."""
    statistics: Final = {}
    for name in reached:
        host = measured.layers.get(name)
        if host is None or host.batches == 0 or host.skipped:
            return None
        try:
            statistics[name] = host.statistics()
        except NonFiniteStatisticsError:
            return None
    return statistics
