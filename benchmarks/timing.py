"""Timing contenders side by side: alternating runs in one process, medians and ratios.

A machine shared with other work speeds up and slows down over seconds. Timing contender A
for a minute and then contender B would compare the machine at two moments, so
:func:`alternate` runs every contender once per repeat, in an order that rotates from one
repeat to the next, and keeps one time per contender and repeat. A ratio is the median
over repeats of the *paired* ratios ``time_A / time_B`` measured in the same repeat, which
cancels slow drifts of the load; medians resist the odd interrupted repeat. Both the
wall-clock time and the process's CPU time are kept for every block.

On a GPU the host returns from a kernel launch long before the kernel ends, so a block's
clocks start and stop with the device's queue empty: ``sync`` (:func:`synchronizer`,
``torch.cuda.synchronize``) runs after the untimed preparation and after the timed calls.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Contender:
    """One way of doing the job: ``run(state)`` is timed, ``prepare()`` (untimed) makes the
    state for it before every timed block (a fresh model copy, for instance)."""

    name: str
    run: Callable[[Any], object]
    prepare: Callable[[], Any] = field(default=lambda: None)


BASES = ("wall", "cpu")


def _nothing_to_wait_for() -> None:
    return None


def synchronizer(device: str) -> Callable[[], None]:
    """What waits until ``device`` has finished the work queued on it: nothing on the CPU,
    ``torch.cuda.synchronize(device)`` on a GPU."""
    if not device.startswith("cuda"):
        return _nothing_to_wait_for
    import torch

    return lambda: torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call of every contender, one value per repeat, in repeat order: wall-clock
    ``seconds`` and the process's CPU time ``cpu_seconds``.

    ``basis`` says which of the two the medians and ratios use by default. With one thread
    the CPU time is the time the work held a core, without the time it waited for one while
    other work ran: on a shared machine the steadier measure of what a call costs.
    """

    seconds: dict[str, list[float]]
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    basis: str = "wall"

    def times(self, name: str, basis: str | None = None) -> list[float]:
        """Seconds per call of ``name``, one per repeat, on ``basis`` (default: ``self.basis``)."""
        basis = basis or self.basis
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        return (self.cpu_seconds if basis == "cpu" else self.seconds)[name]

    def median(self, name: str, basis: str | None = None) -> float:
        """Median seconds per call of ``name`` over the repeats."""
        return statistics.median(self.times(name, basis))

    def paired_ratios(self, name: str, reference: str, basis: str | None = None) -> list[float]:
        """``time(name) / time(reference)`` within each repeat."""
        pairs = zip(self.times(name, basis), self.times(reference, basis), strict=True)
        return [a / b if b > 0 else float("nan") for a, b in pairs]

    def ratio(self, name: str, reference: str, basis: str | None = None) -> float:
        """Median over repeats of the paired ratios ``time(name) / time(reference)``."""
        return statistics.median(self.paired_ratios(name, reference, basis))

    def ratio_range(
        self, name: str, reference: str, basis: str | None = None
    ) -> tuple[float, float]:
        """Smallest and largest paired ratio: how much the repeats disagree."""
        ratios = self.paired_ratios(name, reference, basis)
        return min(ratios), max(ratios)

    def other_basis(self) -> str:
        return "wall" if self.basis == "cpu" else "cpu"

    def summary(self, reference: str) -> dict[str, dict[str, float | str]]:
        """Per contender: median seconds, ratio to ``reference`` and its range on ``basis``,
        and the median and ratio on the other basis."""
        other = self.other_basis()
        recorded = bool(self.cpu_seconds if other == "cpu" else self.seconds)
        out: dict[str, dict[str, float | str]] = {}
        for name in self.seconds:
            low, high = self.ratio_range(name, reference)
            out[name] = {
                "basis": self.basis,
                "median_s": self.median(name),
                "ratio": self.ratio(name, reference),
                "ratio_min": low,
                "ratio_max": high,
                "repeats": len(self.seconds[name]),
            }
            if recorded:
                out[name][f"{other}_median_s"] = self.median(name, other)
                out[name][f"{other}_ratio"] = self.ratio(name, reference, other)
        return out


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` places (so each repeat starts elsewhere)."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def time_block(
    contender: Contender, number: int, sync: Callable[[], None] = _nothing_to_wait_for
) -> float:
    """Seconds per call of ``contender.run`` over ``number`` calls on one prepared state."""
    return time_block_both(contender, number, sync)[0]


def time_block_both(
    contender: Contender, number: int, sync: Callable[[], None] = _nothing_to_wait_for
) -> tuple[float, float]:
    """Wall-clock and CPU seconds per call of ``contender.run`` over ``number`` calls on one
    prepared state, the garbage collector held off during the timed calls (as ``timeit``);
    ``sync()`` before the clocks start and before they stop (the device's queue)."""
    state = contender.prepare()
    sync()
    gc.disable()
    try:
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(number):
            contender.run(state)
        sync()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        gc.enable()
    return elapsed / number, cpu / number


def alternate(
    contenders: Sequence[Contender],
    repeats: int,
    number: int = 1,
    warmup: int = 1,
    basis: str = "wall",
    sync: Callable[[], None] = _nothing_to_wait_for,
) -> Timings:
    """Time every contender once per repeat, rotating the order, ``number`` calls per block.

    ``warmup`` untimed blocks per contender come first (allocator, lazy initialisation,
    caches). Returns seconds per call, one value per contender and repeat, wall-clock and
    CPU; ``basis`` picks the one its medians and ratios use; ``sync`` waits for the device
    (:func:`time_block_both`).
    """
    names = [c.name for c in contenders]
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(
            f"need repeats >= 1, number >= 1, warmup >= 0; got {repeats}, {number}, {warmup}"
        )
    for _ in range(warmup):
        for contender in contenders:
            time_block(contender, 1, sync)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for contender in rotated(list(contenders), repeat):
            wall, cpu = time_block_both(contender, number, sync)
            seconds[contender.name].append(wall)
            cpu_seconds[contender.name].append(cpu)
    return Timings(seconds, cpu_seconds, basis)


def calls_for(
    seconds_per_call: float, budget: float, at_least: int = 1, at_most: int = 1000
) -> int:
    """How many calls fit in ``budget`` seconds, clamped to ``[at_least, at_most]``."""
    if seconds_per_call <= 0:
        return at_most
    return max(at_least, min(at_most, int(budget / seconds_per_call)))
