"""The eval-mode passes of the Keras and Flax tools, level by level (:func:`measure_levels`),
as :func:`bnstats.torch._eval_exact.measure_eval_exact` does for torch: each pass, the layers
already settled normalize with their final statistics and every other BN layer is measured
and outputs NaN; a layer whose input was finite in every batch depends on settled layers
only and settles. A last pass checks the result. Each pass is :mod:`bnstats._host_pass`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from bnstats._host_pass import Final, HostLayer, HostMeasured, check_unreached
from bnstats._levels import Pending, require_standstill, settle_level, settle_next

LevelRun = Callable[[Final, bool], HostMeasured]
"""``run_level(final, measure_settled)``: one pass (``nonfinite="skip"``,
``unreached="keep"``) in which the layers in ``final`` normalize with those statistics (and
are measured too where ``measure_settled``) and every other BN layer is measured and
outputs NaN."""


class OneBatch(Protocol):
    """What :func:`measure_levels` asks of eval mode's one batch
    (:class:`bnstats._host_one_batch.OneBatch`): ``solve`` after the first pass (the result,
    or None where the levels go on), the passes it ``spent`` and its forwards over eval
    mode's subset (``subset_spent``)."""

    spent: int
    subset_spent: int

    def solve(
        self, first: HostMeasured, run_level: LevelRun, epsilons: Mapping[str, float]
    ) -> HostMeasured | None: ...


CHECK_TARGET = 1e-4
"""How far the check pass of :func:`measure_levels` may move a layer's statistics (in units
of its output: ``|d mean| / sqrt(var + eps)``, ``|d var| / (var + eps)``)."""


def measure_levels(
    run_level: LevelRun,
    nonfinite: str,
    unreached: str,
    epsilons: Mapping[str, float],
    one_batch: OneBatch | None = None,
) -> HostMeasured:
    """Every BN layer's population moments with every BN layer before it normalizing with its
    own final statistics: the fixed point of inference, one pass per depth level.

    In each pass the settled layers normalize with their statistics and every other BN layer
    is measured and outputs NaN (``run_level``). A layer whose input was finite in some batch
    settles; one that saw NaN in every batch waits for the next level. NaN in some batches
    only came from the data: ``nonfinite="raise"`` fails, ``"skip"`` leaves those batches
    out. NaN shows a dependence only where it passes (``sign``, ``nan_to_num``, comparisons
    and ``argmax`` stop it), so one more pass, every layer normalizing with its statistics
    and measured, checks them: a layer moving by more than :data:`CHECK_TARGET` (with its
    ``epsilons[name]``) fails the call, naming it.

    With ``one_batch`` (:class:`bnstats._host_one_batch.OneBatch`, whose ``batches()`` the
    passes of ``run_level`` go over) the data that fit run as one batch after a first pass
    that did not settle every layer, and one check pass ends the call (3 passes); data over
    the budget take the subset iteration (:mod:`bnstats._host_subset`) instead; where
    neither can be used or the check pass moved the statistics, the levels go on from the
    first pass (the passes the one batch or the subset ran are counted in the result's, the
    forwards over the subset as ``subset_passes``).
    """
    settled: dict[str, HostLayer] = {}
    first: HostMeasured | None = None
    passes = 0
    while True:
        final = {name: layer.statistics() for name, layer in settled.items()}
        measured = run_level(final, False)
        passes += 1
        if first is None:
            first = measured
            check_unreached(first, unreached)
        if settle_next(
            measured.layers,
            settled,
            first.layers,
            first.unreached,
            lambda pending: _settle_level(pending, nonfinite),
        ):
            break
        if passes == 1 and one_batch is not None:
            solved = one_batch.solve(first, run_level, epsilons)
            if solved is not None:
                return solved
    layers = {name: settled.get(name, layer) for name, layer in first.layers.items()}
    passes += 1 + (0 if one_batch is None else one_batch.spent)  # the check, the one batch's
    result = HostMeasured(
        layers,
        first.batch_sizes,
        unreached=first.unreached,
        passes=passes,
        subset_passes=0 if one_batch is None else one_batch.subset_spent,
    )
    final = {layer.name: layer.statistics() for layer in result.reached()}
    checked = run_level(final, True)
    _require_standstill(final, checked, epsilons)
    return result


def movements(
    final: Final, checked: HostMeasured, epsilons: Mapping[str, float]
) -> dict[str, float]:
    """How far the pass ``checked`` moved each layer of ``final`` from the statistics it
    normalized with: ``max(|d mean| / sqrt(var + eps), |d var| / (var + eps))`` over its
    channels, ``var`` the new one and ``eps`` its ``epsilons[name]``."""
    moved = {}
    for name, (mean, var) in final.items():
        new_mean, new_var = checked.layers[name].statistics()
        scale = new_var + epsilons[name]
        moved[name] = float(
            max(
                np.max(np.abs(new_mean - mean) / np.sqrt(scale)),
                np.max(np.abs(new_var - var) / scale),
            )
        )
    return moved


def _require_standstill(final: Final, checked: HostMeasured, epsilons: Mapping[str, float]) -> None:
    """``ValueError`` naming the layer the check pass moved most, if by more than
    :data:`CHECK_TARGET`."""
    require_standstill(
        movements(final, checked, epsilons),
        CHECK_TARGET,
        "mode='eval'",
        repr,
        "such a model cannot be measured level by level",
    )


def _settle_level(pending: list[HostLayer], nonfinite: str) -> list[HostLayer]:
    """The layers of this level (:func:`bnstats._levels.settle_level`)."""
    entries = [
        Pending(
            layer,
            f"BN layer {layer.name!r}",
            repr(layer.name),
            layer.batches,
            layer.skipped,
            layer.max_calls_per_forward,
        )
        for layer in pending
    ]
    return [entry.layer for entry in settle_level(entries, nonfinite)]
