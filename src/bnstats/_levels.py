"""Which BN layers settle at one level of an exact eval-mode pass, in every framework.

Level by level, the layers already settled normalize with their final statistics and every
other BN layer is measured and outputs NaN. A layer whose input was finite in some batch
depends on settled layers only: it settles. One that saw NaN in every batch was computed
from an unsettled layer and waits for the next level. NaN in some batches only came from the
data: ``nonfinite="raise"`` fails, ``"skip"`` leaves those batches out.

Making several passes needs data that can be gone over again: :func:`require_reusable` is
the one refusal of a one-shot iterator, for every framework and every tool that needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnstats.stats import NonFiniteStatisticsError


@dataclass(frozen=True)
class Pending:
    """One unsettled layer after a level's pass: ``layer`` (the caller's record), how its
    messages name it (``label``, e.g. ``BN layer 'stem.bn'``, and ``shown``, ``'stem.bn'``),
    its ``batches``, those with NaN or Inf (``bad``) and the most calls one forward made."""

    layer: Any
    label: str
    shown: str
    batches: int
    bad: int
    max_calls_per_forward: int


def settle_level(
    pending: Sequence[Pending], nonfinite: str, who: str = "mode='eval'"
) -> list[Pending]:
    """The layers of ``pending`` that settle at this level; errors, beginning with ``who``
    (the option measuring level by level), say why none can."""
    ready = []
    for entry in pending:
        if entry.bad >= entry.batches:
            continue
        if entry.bad and entry.max_calls_per_forward > 1:
            raise ValueError(
                f"{who}: {entry.label} is called {entry.max_calls_per_forward} times "
                "per forward and some calls received NaN: one call's input comes from another "
                "call's output (no eval-mode order for it), or the data holds NaN; nothing "
                "was written"
            )
        if entry.bad and nonfinite == "raise":
            raise NonFiniteStatisticsError(
                f"{entry.label}: {entry.bad} of {entry.batches} batches brought NaN or Inf "
                "statistics in eval mode; nothing was written. Pass nonfinite='skip' to leave "
                "such batches out"
            )
        ready.append(entry)
    if not ready:
        names = ", ".join(entry.shown for entry in pending)
        raise ValueError(
            f"{who}: BN layer(s) {names} received NaN or Inf in every batch even with "
            "every layer before them settled: NaN in the data, or a layer computed from its "
            "own output (called more than once per forward); nothing was written"
        )
    return ready


def settle_next(
    measured: Mapping[str, Any],
    settled: dict[str, Any],
    first: Mapping[str, Any],
    unreached: Collection[str],
    settle: Callable[[list[Any]], list[Any]],
) -> bool:
    """One level's bookkeeping, in every framework: the layers of this pass (``measured``,
    each with a ``name`` and ``first_reached``) neither settled nor ``unreached`` are
    pending; ``settle`` picks those of this level (:func:`settle_level`), which take their
    order from the first level's records (``first``) and join ``settled``. True when the
    levels are done: nothing was pending, or everything pending settled."""
    pending = [m for name, m in measured.items() if name not in settled and name not in unreached]
    if not pending:
        return True
    ready = settle(pending)
    for layer in ready:
        layer.first_reached = first[layer.name].first_reached
        settled[layer.name] = layer
    return len(ready) == len(pending)


def require_standstill(
    moved: Mapping[str, float],
    limit: float,
    who: str,
    shown: Callable[[str], str],
    remedy: str,
) -> None:
    """``ValueError`` naming the layer a check pass moved most (every layer normalizing with
    the statistics measured level by level), if by more than ``limit``: a dependence the NaN
    did not show, or batches that differ between passes. ``who`` the option measuring level
    by level, ``shown(name)`` a layer's name as the framework quotes it, ``remedy`` what a
    user can do about the first cause."""
    worst = max(moved, key=lambda name: moved[name], default=None)
    if worst is None or moved[worst] <= limit:
        return
    raise ValueError(
        f"{who}: with every BN layer normalizing with the statistics measured level by level, "
        f"BN layer {shown(worst)} moves by {moved[worst]:.3g} (more than {limit:g}): either it "
        "depends on a layer measured in its level or later though no NaN reached it (an "
        "operation between them turns NaN into numbers: sign, nan_to_num, a comparison, "
        f"argmax; {remedy}), or the batches differ from pass to pass (random augmentation, "
        "a shuffling loader cut by max_samples; give batches that repeat); nothing was "
        "written"
    )


def require_reusable(
    batches: Iterable[Any],
    *,
    who: str = "mode='eval'",
    argument: str = "batches",
    examples: str = "a list",
) -> None:
    """``TypeError`` when ``batches`` can be gone over only once (a generator, an iterator:
    ``collections.abc.Iterator``, told without calling ``iter``, which would start a
    DataLoader's worker processes for nothing), worded the same wherever several passes
    are needed::

        {who} passes over {argument} several times and needs an iterable it can go over
        again ({examples}), not a one-shot iterator or generator

    ``who`` is what needs the passes (``"mode='eval'"``, ``"diagnose"``), ``argument`` the
    name the user passed the data as, ``examples`` what that framework takes instead
    (``"a list, a DataLoader"``)."""
    if isinstance(batches, Iterator):
        raise TypeError(
            f"{who} passes over {argument} several times and needs an iterable it can go over "
            f"again ({examples}), not a one-shot iterator or generator"
        )
