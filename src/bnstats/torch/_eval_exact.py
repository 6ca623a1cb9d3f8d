"""``mode="eval_exact"``: every BN layer's input as eval-mode inference gives it, level by
level, one pass per depth level of the BN layers and a check pass
(:func:`measure_eval_exact`); and the refusal of batches that cannot be gone over again,
which every multi-pass mode shares (:func:`reusable_batches_first`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
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
    movement,
    statistics_of,
)
from bnstats.torch._layer_pass import LayerPass, Measured
from bnstats.torch._layers import display_name, find_batchnorm_layers, unwrap
from bnstats.torch._level import MISS_PROBABILITY, Level
from bnstats.torch._pass import Call, Check, measure_pass
from bnstats.torch.options import PassOptions


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
    check = reusable_batches_first(batches, check, "mode='eval_exact'")  # on every rank
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
        data_batches=first.data_batches,
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


def reusable_batches_first(batches: Any, check: Check | None, who: str) -> Check:
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
