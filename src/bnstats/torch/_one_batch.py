"""``mode="eval"`` on data small enough to run as one batch: the fixed point of eval-mode
inference in one forward, then one pass over the batches as given to check it.

``F(s)`` is every BN layer's input population (mean, unbiased var) over all the data when
every BN layer normalizes with ``s``; eval mode looks for ``s* = F(s*)``. Run all the data as
one batch with every BN layer normalizing each call with its own input's population
(``Level(rule="own")``): a layer's input depends only on the layers before it, and each of
those normalized with its own population over all the data, so each layer's statistics are
already ``s*`` when the forward reaches it. That is the level-by-level algorithm
(``mode="eval_exact"``) in one forward, whatever the depth. Then one fixed pass over the
batches as the user gave them at that ``s``, judged as every eval-mode result is
(:func:`bnstats.torch._eval_statistics.movement`, at most
:data:`bnstats.torch._eval_statistics.EVAL_TARGET`): where the joined batch was not the same
data (a batch whose first dimension is not its samples, a model that mixes its samples,
inputs that change from pass to pass), that pass moves the statistics and the plain whole
passes go on from it (:func:`bnstats.torch._measure.measure_eval_mode`).

Used where it is safe to hold the data as one batch (:func:`fits_one_batch`,
:func:`join_batches`; across torch.distributed ranks, every rank runs the one batch of all
ranks' data, gathered, :func:`one_batch_statistics`): every BN layer called at most once
per forward (a layer called twice normalizes its first call before seeing its second), the
largest BN input of the joined batch within the budget (``one_batch_bytes``, by default
:data:`bnstats._one_batch.ONE_BATCH_BYTES`; per
layer: values per channel over the data, times channels, times the element size of its
buffers, from a pass over the same data), and batches that join
(:func:`bnstats._one_batch.join`; tensors also on the same device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from bnstats import _one_batch
from bnstats._one_batch import ArrayKind, array_bytes, budget, join_or_none, largest_input
from bnstats.torch._batches import iterate_batches, move_to_device
from bnstats.torch._eval_statistics import Run, iterate_statistics
from bnstats.torch._layer_pass import Measured
from bnstats.torch._level import Level, Statistics
from bnstats.torch._pass import Call
from bnstats.torch._ranks import resolve_group, run_and_exchange
from bnstats.torch.options import PassOptions

TENSORS = ArrayKind(
    is_array=lambda value: isinstance(value, torch.Tensor),
    joins_with=lambda first, part: (
        part.dim() >= 1
        and part.shape[1:] == first.shape[1:]
        and part.dtype == first.dtype
        and part.device == first.device
    ),
    concatenate=torch.cat,
    nbytes=lambda tensor: tensor.numel() * tensor.element_size(),
)
"""Tensors join where they have the same trailing shape, dtype and device."""


def kept_batches(batches: Any, options: PassOptions) -> _one_batch.KeptBatches:
    """``batches`` as given (its refusals: a tensor, not iterable), keeping what pass 1 draws
    for the one batch within the budget (:class:`bnstats._one_batch.KeptBatches`)."""
    return _one_batch.KeptBatches(
        batches,
        TENSORS,
        budget(options.one_batch_bytes),
        lambda given: (batch for batch, _ in iterate_batches(given)),
    )


def fits_one_batch(measured: Measured, scale: float, limit: int) -> bool:
    """True where data of ``scale`` times the samples of the pass ``measured`` can run as one
    batch: no BN layer called more than once in a forward, and the largest BN input over
    the data at most ``limit`` bytes (:func:`joined_bytes`)."""
    largest = joined_bytes(measured)
    return largest is not None and largest * scale <= limit


def joined_bytes(measured: Measured) -> float | None:
    """The largest BN input of the data of the pass ``measured`` joined into one batch, in
    bytes: per layer, values per channel over the data times channels times the element
    size of its buffers (:func:`bnstats._one_batch.largest_input`); None where a BN layer
    was called more than once in a forward."""
    return largest_input(
        (
            moments.max_calls_per_forward,
            float(moments.population.count)
            * moments.population.mean.numel()
            * moments.layer.running_var.element_size(),
        )
        for moments in measured.reached()
    )


def join_batches(batches: Iterable[Any], max_samples: int | None, limit: int) -> Any | None:
    """All of ``batches`` (within ``max_samples``) as one batch of the same structure; None
    where they do not join (module docstring) or hold more than ``limit`` bytes."""
    parts, held = [], 0
    for batch, _ in iterate_batches(batches, max_samples):
        held += array_bytes(batch, TENSORS)
        if held > limit:
            return None  # no further batch drawn
        parts.append(batch)
    return join_or_none(parts, TENSORS)


class JoinedForward:
    """Batches ``joined`` into one batch, and the forward over it that solves them (all the
    data: :func:`one_batch_statistics`; a subset:
    :func:`bnstats.torch._subset_iteration._solve_on_subset`): in one process a pass of
    ``run_alone`` over it; across the ranks of ``group`` every rank holds all ranks' batches
    joined (:func:`_gathered`), runs the same forward, and takes rank 0's statistics
    (:func:`_solved_on_every_rank`), so that the ranks go on from the same ones."""

    def __init__(self, joined: Any, run_alone: Run, group: Any = None, call: Call | None = None):
        self.joined, self.run_alone, self.group, self.call = joined, run_alone, group, call

    def solve(self, level: Level, finish: Callable[[Measured], Statistics]) -> Statistics | None:
        """``finish`` of the pass at ``level`` over the joined batch; None where the forward
        failed (on any rank; :func:`run_one_batch`)."""

        def here() -> Statistics | None:
            measured = run_one_batch(self.run_alone, level, self.joined)
            return None if measured is None else finish(measured)

        if self.group is None:
            return here()
        return _solved_on_every_rank(self.group, here, self.call or {})


def joined_if_fits(
    batches: Any,
    measured: Measured,
    *,
    run_alone: Run,
    options: PassOptions,
    call: Call,
    scale: float = 1.0,
) -> JoinedForward | None:
    """All of ``batches`` (within ``options.max_samples``) joined into one batch, where data
    of ``scale`` times the samples of the pass ``measured`` (over all ranks) fit; across
    ranks all ranks' batches, gathered on every rank (:func:`_gathered`); else None."""
    group = resolve_group(options.group)
    if group is not None:
        every = _gathered(group, batches, measured, scale, options, call)
        return None if every is None else JoinedForward(every, run_alone, group, call)
    joined = _fitting_joined(batches, measured, scale, options)
    return None if joined is None else JoinedForward(joined, run_alone)


def _fitting_joined(
    batches: Any, measured: Measured, scale: float, options: PassOptions
) -> Any | None:
    """``batches`` joined where data of ``scale`` times the samples of ``measured`` fit; None
    where ``batches`` is None (inputs over the budget,
    :class:`bnstats._one_batch.KeptBatches`), they do not fit or do not join."""
    limit = budget(options.one_batch_bytes)
    if batches is None or not fits_one_batch(measured, scale, limit):
        return None
    return join_batches(batches, options.max_samples, limit)


def one_batch_statistics(
    run_alone: Run,
    batches: Any,
    measured: Measured,
    scale: float,
    options: PassOptions,
    start: Statistics,
    call: Call,
) -> Statistics | None:
    """Every layer's statistics from the one-batch forward over all of ``batches`` (each
    layer normalizing each call with its own input's population), where data of ``scale``
    times the samples of the pass ``measured`` fit (:func:`fits_one_batch`) and the batches
    join (:func:`join_batches`); a layer it did not reach, or whose statistics are not
    finite, keeps ``start``'s. None where the data do not fit (``batches`` None: their
    inputs alone are over the budget, :class:`bnstats._one_batch.KeptBatches`) or the forward failed
    (:func:`run_one_batch`). ``run_alone`` runs a pass on this process's data alone.

    Across ranks (``measured`` merged over them, so every rank judges the same fit) every
    rank joins its batches, one status exchange (``call`` compared) gives their sizes, every
    rank gathers all ranks' joined batches in rank order and runs the one batch of all the
    data itself, and a second exchange hands every rank rank 0's statistics, so that the
    ranks go on from the same ones (None on every rank where any rank's batches did not
    join or its forward failed)."""
    forward = joined_if_fits(
        batches, measured, run_alone=run_alone, options=options, call=call, scale=scale
    )
    if forward is None:
        return None
    return forward.solve(
        Level(training=False, rule="own"),
        lambda one: {**start, **iterate_statistics(one, start)},
    )


def _gathered(
    group: Any, batches: Any, measured: Measured, scale: float, options: PassOptions, call: Call
) -> Any | None:
    """Every rank's ``batches`` joined, then all ranks' joined batches gathered in rank order
    (through the CPU) and joined again, the same on every rank; None on every rank where
    any rank's do not fit or join (:func:`_fitting_joined`) or all of them together are over
    the budget. Every rank says whether its data fit and join (a status exchange, ``call``
    compared, also where they do not), so that all take the same way."""

    def join_here() -> tuple[Any, int | None]:
        joined = _fitting_joined(batches, measured, scale, options)
        return joined, None if joined is None else array_bytes(joined, TENSORS)

    joined, sizes = run_and_exchange(group, join_here, {**call, "step": "one batch: join"})
    if any(size is None for size in sizes) or sum(sizes) > budget(options.one_batch_bytes):
        return None
    parts: list[Any] = [None] * len(sizes)
    torch.distributed.all_gather_object(parts, move_to_device(joined, torch.device("cpu")), group)
    return join_or_none(parts, TENSORS)  # the same parts on every rank: the same outcome


def _solved_on_every_rank(
    group: Any, solve: Callable[[], Statistics | None], call: Call
) -> Statistics | None:
    """``solve()`` on every rank of ``group`` and rank 0's result on all (one exchange,
    ``call`` compared), on each rank's devices; None on every rank where it was None on
    any."""

    def solve_here() -> tuple[Statistics | None, Any]:
        solved = solve()
        return solved, move_to_device(solved, torch.device("cpu"))

    solved, shared = run_and_exchange(group, solve_here, {**call, "step": "one batch: solve"})
    if solved is None or any(statistics is None for statistics in shared):
        return None
    return {
        name: (mean.to(solved[name][0]), var.to(solved[name][1]))
        for name, (mean, var) in shared[0].items()
    }


def run_one_batch(run: Run, level: Level, joined: Any) -> Measured | None:
    """The pass at ``level`` over the one batch ``joined``; None where it failed (a model
    that fixes its batch size, memory short): the model is as it was, and the passes of
    data over the budget run instead, which meet the same error if it is the model's."""
    try:
        return run(level, [joined])
    except Exception:  # noqa: BLE001 (the one batch is a shortcut; the passes still run)
        return None
