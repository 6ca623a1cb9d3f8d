"""Which batches form the subset of eval mode's subset iteration
(:mod:`bnstats.torch._subset_iteration`), and how large it is.

- Large data (at least :data:`SUBSET_SHARE` subsets over all ranks): the first batches
  holding :data:`SUBSET_SAMPLES` samples (:func:`subset_batches`), drawn before any whole
  pass where the data's size can be estimated up front (:func:`subset_before_passes`:
  batches with a length on every rank, no ``tolerance``), else after the batch-statistics
  pass, from the batches it drew.
- Smaller data, where four whole passes did not converge: the *late subset*, the first
  batches holding a ``1 / LATE_SHARE`` share of the samples or :data:`LATE_SUBSET_SAMPLES`,
  at most a ``1 / LATE_MOST`` share of the batches (:func:`late_subset_batches`).
- Sized to the one-batch budget (:func:`sized_subset`), so that each solve is one forward
  over the joined subset: grown where the subset joins and the budget takes at least
  :data:`GROWN_LEAST` times its samples (at most a ``1 / LATE_MOST`` share of the data),
  shrunk to its first batches that join where it does not (down to :data:`SHRUNK_LEAST`
  samples).

Across torch.distributed ranks each rank draws its first batches holding its share of the
samples, and one status exchange gives every rank the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bnstats._one_batch import budget
from bnstats.torch._batches import data_length, iterate_batches
from bnstats.torch._eval_statistics import Run
from bnstats.torch._layer_pass import Measured
from bnstats.torch._level import Level
from bnstats.torch._one_batch import joined_bytes
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

Size = Callable[[list[Any], Measured], tuple[list[Any], Measured, list[Any] | None]]
"""``size(drawn, subset_start)``: the subset sized to the budget from the ``drawn`` batches
and their batch-statistics pass (:func:`sized_subset` with the data, their samples, the
options and the call bound): its batches, their batch-statistics pass, and ``drawn`` as the
fallback where sized (else None)."""


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


def subset_before_passes(
    batches: Any, options: PassOptions, call: Call
) -> tuple[list[Any], float] | None:
    """The subset, drawn before any whole pass, and the data's samples over all ranks (estimated
    from the first batches' mean size), where that can be decided up front: no ``tolerance``, on
    every rank ``batches`` with a length, and (at the first batches' mean size, within
    ``max_samples``) at least :data:`SUBSET_SHARE` subsets of data over all ranks; None
    otherwise (then the batch-statistics pass comes first,
    ``_subset_iteration.iterate_with_subset``). In a group every rank draws its first batches
    holding its share of the subset's samples, and one status exchange (``call`` compared; a
    rank's failure raised on every rank) gives every rank the same decision."""
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
    """The subset for the rounds of :mod:`bnstats.torch._subset_iteration`, sized to the
    one-batch budget, so that each round's solve is one forward: where the ``drawn`` batches
    (their batch-statistics pass ``subset_start``, over all ranks) join within the budget, the
    first batches holding as many samples as the budget takes joined, at most a ``1 /
    LATE_MOST`` share of the data's ``samples`` (where that is :data:`GROWN_LEAST` times the
    subset or more: the subset's sampling error, which sets how much a round shrinks the
    distance, is smaller; trained mobilenet_v2 on 32,768 digits: 6 whole passes at 1,024
    samples, 4 at 2,720); where they do not join, their first batches that do, where those hold
    at least :data:`SHRUNK_LEAST` samples (the subset passes of a solve become one forward: conv
    chain 4 + 122 passes at 1,024 samples, 4 + 9 at 496). Each with its own batch-statistics
    pass (one more subset pass) and ``drawn`` as the fallback; else ``drawn`` as it is (fallback
    None). Across ranks each rank draws its share, and one status exchange (``call`` compared)
    sizes the subset only where every rank's changed."""
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
