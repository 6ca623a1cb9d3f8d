"""Batches that count the passes over them, for the tests and benchmarks of eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class Counted(list):
    """A list of batches that counts how often a pass goes over it (``drawn``)."""

    drawn = 0

    def __iter__(self) -> Iterator[Any]:
        self.drawn += 1
        return super().__iter__()
