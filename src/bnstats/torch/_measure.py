"""What recalibrate, audit and adapt measure: the statistics of the mode they are asked for.

``mode="train"``: one pass (:func:`bnstats.torch._pass.measure_pass`), the BN layers
normalizing with each batch's statistics. ``mode="eval"``: one pass per depth level of the
BN layers (:func:`measure_eval_mode`), until every layer's input is the one eval-mode
inference gives it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from bnstats.stats import NonFiniteStatisticsError
from bnstats.torch._layers import display_name
from bnstats.torch._pass import Call, Check, LayerPass, Level, Measured, measure_pass
from bnstats.torch.options import PassOptions


def measure(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    tool: str,
    check: Check | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> Measured:
    """Every BN layer's population moments over all ranks' ``batches``, in ``options.mode``.

    In a group the ranks compare ``tool``, ``options`` as given and the tool's other
    ``arguments`` that change the result (adapt's ``prior``, say) before anything else."""
    call = {"tool": tool, **options.call(), **(arguments or {})}
    if options.mode == "eval":
        return measure_eval_mode(model, batches, options, tool=call, check=check)
    return measure_pass(model, batches, options, tool=call, check=check)


def measure_eval_mode(
    model: nn.Module, batches: Any, options: PassOptions, *, tool: Call, check: Check | None = None
) -> Measured:
    """Every BN layer's population moments with every BN layer before it normalizing with
    its own final statistics: the fixed point of eval-mode inference.

    Level by level (:class:`bnstats.torch._pass.Level`): each pass runs the model in eval
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
    """
    check = _reusable_batches_first(batches, check)  # in a group: refused on every rank
    level_options = replace(options, nonfinite="skip", unreached="keep")
    settled: dict[str, LayerPass] = {}
    skipped: dict[str, int] = {}
    first: Measured | None = None
    sizes: list[int | None] = []
    passes = 0
    while True:
        final = {name: moments.population for name, moments in settled.items()}
        if first is None:  # a tolerance stop waits for every layer under unreached="raise"
            level, kept = Level(False), replace(level_options, unreached=options.unreached)
        else:  # and then for those the first level reached
            reached = frozenset(first.layers) - set(first.unreached)
            level, kept = Level(False, settled=final, awaited=reached), level_options
        measured = measure_pass(model, batches, kept, tool=tool, check=check, level=level)
        passes += 1
        sizes = max(sizes, measured.batch_sizes, key=len)
        if first is None:
            first = measured
            first.check_coverage(options)
        pending = [
            m
            for name, m in measured.layers.items()
            if name not in settled and name not in first.unreached
        ]
        if not pending:
            break
        ready = _settle_level(pending, measured, options, skipped)
        for moments in ready:
            moments.first_reached = first.layers[moments.name].first_reached
            settled[moments.name] = moments
        if len(ready) == len(pending):
            break
    layers = {name: settled.get(name, moments) for name, moments in first.layers.items()}
    return Measured(
        layers,
        sizes,
        unreached=first.unreached,
        fixed=first.fixed,
        skipped=skipped,
        passes=passes,
    )


def _reusable_batches_first(batches: Any, check: Check | None) -> Check:
    """``check``, after refusing a one-shot iterator for ``batches``."""

    def checked(model: nn.Module) -> None:
        if iter(batches) is batches:
            raise TypeError(
                "mode='eval' passes over batches once per depth level and needs an iterable it "
                "can go over again (a list, a DataLoader), not a one-shot iterator or generator"
            )
        if check is not None:
            check(model)

    return checked


def _settle_level(
    pending: list[LayerPass], measured: Measured, options: PassOptions, skipped: dict[str, int]
) -> list[LayerPass]:
    """The layers of this level: those whose input was finite in some batch (NaN in every
    batch: computed from an unsettled layer). A layer with NaN in some batches only got it
    from the data: ``nonfinite="raise"`` fails, ``"skip"`` counts them into ``skipped``."""
    ready = []
    for moments in pending:
        bad = measured.skipped.get(moments.name, 0)
        if bad >= moments.batches:
            continue
        if bad and moments.max_calls_per_forward > 1:
            raise ValueError(
                f"mode='eval': {moments.label} is called {moments.max_calls_per_forward} times "
                "per forward and some calls received NaN: one call's input comes from another "
                "call's output (no eval-mode order for it), or the data holds NaN; nothing "
                "was written"
            )
        if bad and options.nonfinite == "raise":
            raise NonFiniteStatisticsError(
                f"{moments.label}: {bad} of {moments.batches} batches brought NaN or Inf "
                "statistics in eval mode; nothing was written. Pass nonfinite='skip' to leave "
                "such batches out"
            )
        if bad:
            skipped[moments.name] = bad
        ready.append(moments)
    if not ready:
        names = ", ".join(display_name(m.name) for m in pending)
        raise ValueError(
            f"mode='eval': BN layer(s) {names} received NaN or Inf in every batch even with "
            "every layer before them settled: NaN in the data, or a layer computed from its "
            "own output (called more than once per forward); nothing was written"
        )
    return ready
