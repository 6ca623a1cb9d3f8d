"""What eval mode's one batch is in every framework: the budget, the batches a pass keeps for
it, and how batches join into one.

Eval mode's fixed point ``s* = F(s*)`` (every BN layer's input population when every BN layer
normalizes with ``s*``) is one forward away where all the data run as one batch and every BN
layer normalizes each call with its own input's population: each layer's input depends only
on the layers before it, and those already normalized with their populations over all the
data. The torch tools (:mod:`bnstats.torch._one_batch`) and the Keras and Flax tools
(:mod:`bnstats._host_one_batch`) run it where the data fit the budget (:func:`budget`) and the
batches join (:func:`join`): arrays of the same trailing shape and dtype (a framework may ask
more, the same device, say), joined along the first dimension, inside the same tuples,
lists, dicts and namedtuples; any other part equal in every batch. NumPy-free: each
framework says what its arrays are (:class:`ArrayKind`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ONE_BATCH_BYTES = 256 * 2**20
"""The default budget: the largest BN input (and the joined inputs) that eval mode runs as
one batch, 256 MiB (the forward of such a batch holds a few times that). Over all ranks'
data together. The tools' ``one_batch_bytes=`` sets another (:func:`budget`)."""

EQUAL_LEAVES = (int, float, str, bool, type(None))
"""Parts of a batch other than arrays that may be joined: kept where equal in every batch."""


class CannotJoin(Exception):
    """The batches do not join into one (:func:`join`)."""


@dataclass(frozen=True)
class ArrayKind:
    """A framework's arrays, as joining sees them: ``is_array(value)``, ``joins_with(first,
    part)`` (``part`` joins ``first`` along the first dimension), ``concatenate(parts)`` and
    ``nbytes(array)``."""

    is_array: Callable[[Any], bool]
    joins_with: Callable[[Any, Any], bool]
    concatenate: Callable[[list[Any]], Any]
    nbytes: Callable[[Any], int]


def budget(one_batch_bytes: int | None) -> int:
    """The budget a call runs under: ``one_batch_bytes`` as the user gave it (0: never one
    batch), or :data:`ONE_BATCH_BYTES` where None."""
    return ONE_BATCH_BYTES if one_batch_bytes is None else one_batch_bytes


def fits_budget(layers: Iterable[tuple[int, float]], limit: int) -> bool:
    """True where the data can run as one batch: ``layers`` gives, per BN layer, the most
    calls one forward made and the bytes of its input over all the data. No layer may be
    called more than once in a forward (the one batch would normalize its first call
    before seeing its second), and the largest input must be at most ``limit`` bytes."""
    largest = largest_input(layers)
    return largest is not None and largest <= limit


def largest_input(layers: Iterable[tuple[int, float]]) -> float | None:
    """The largest of ``layers``' input bytes (as :func:`fits_budget` takes them; 0 for no
    layer); None where a layer was called more than once in a forward (such data never run
    as one batch)."""
    largest = 0.0
    for calls, size in layers:
        if calls > 1:
            return None
        largest = max(largest, size)
    return largest


def check_budget(one_batch_bytes: Any) -> None:
    """``ValueError`` unless ``one_batch_bytes`` is None or an integer of at least 0."""
    if one_batch_bytes is not None and (
        isinstance(one_batch_bytes, bool)
        or not isinstance(one_batch_bytes, numbers.Integral)
        or one_batch_bytes < 0
    ):
        raise ValueError(
            f"one_batch_bytes must be a number of bytes (0 or more) or None, got "
            f"{one_batch_bytes!r}"
        )


def array_bytes(value: Any, kind: ArrayKind) -> int:
    """Bytes of all the arrays in ``value`` (nested tuples, lists, dicts)."""
    if kind.is_array(value):
        return kind.nbytes(value)
    if isinstance(value, Mapping):
        return sum(array_bytes(v, kind) for v in value.values())
    if isinstance(value, tuple | list):
        return sum(array_bytes(v, kind) for v in value)
    return 0


def join(parts: list[Any], kind: ArrayKind) -> Any:
    """``parts`` (one per batch, alike) joined along the first dimension of their arrays;
    :class:`CannotJoin` where they are not alike."""
    first = parts[0]
    if kind.is_array(first):
        if not all(kind.is_array(part) and kind.joins_with(first, part) for part in parts):
            raise CannotJoin
        return kind.concatenate(parts)
    if isinstance(first, Mapping):
        if not all(isinstance(p, Mapping) and p.keys() == first.keys() for p in parts):
            raise CannotJoin
        return {key: join([part[key] for part in parts], kind) for key in first}
    if isinstance(first, tuple | list):
        if not all(type(p) is type(first) and len(p) == len(first) for p in parts):
            raise CannotJoin
        joined = [join([part[i] for part in parts], kind) for i in range(len(first))]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # a namedtuple
            return type(first)(*joined)
        return type(first)(joined)
    if isinstance(first, EQUAL_LEAVES) and all(
        type(p) is type(first) and p == first for p in parts
    ):
        return first
    raise CannotJoin


def join_or_none(parts: list[Any], kind: ArrayKind) -> Any | None:
    """:func:`join`, None where the parts do not join (or there are none)."""
    if not parts:
        return None
    try:
        return join(parts, kind)
    except CannotJoin:
        return None


class KeptBatches:
    """``batches`` as ``draw(batches)`` yields them, keeping each batch an iteration draws
    while their arrays hold at most ``limit`` bytes (``kept``; None once they hold more): the
    first pass keeps what the one batch joins, so that the data are not drawn once more for
    it. With ``keep_first``, the first batches within ``limit`` stay kept (``first``) where
    the rest are not (eval mode's subset, :mod:`bnstats._host_subset`)."""

    def __init__(
        self,
        batches: Any,
        kind: ArrayKind,
        limit: int,
        draw: Callable[[Any], Iterable[Any]] = iter,
        keep_first: bool = False,
    ) -> None:
        self.batches = batches
        self.kind = kind
        self.limit = limit
        self.draw = draw
        self.keep_first = keep_first
        self.kept: list[Any] | None = []
        self.first: list[Any] = []

    def __len__(self) -> int:
        """The length of ``batches`` (``TypeError`` where they have none, as ``len`` gives)."""
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        self.kept = self.first = []
        held = 0
        for batch in self.draw(self.batches):
            if held <= self.limit:
                held += array_bytes(batch, self.kind)
                if held <= self.limit:
                    self.first.append(batch)
                else:
                    self.kept = None
                    self.first = self.first if self.keep_first else []
            yield batch
