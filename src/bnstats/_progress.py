"""The progress bar of long passes, for every framework.

``progress=True`` shows a rich bar on stderr with the samples seen and, where the pass knows
it, the worst relative standard error; ``None`` shows it only when stderr is a terminal;
``False`` never. Without rich installed there is no bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[int, float], None]
"""``advance(samples, worst)``: samples seen so far and the worst relative standard error
(inf while unknown)."""


def _ignore(samples: int, worst: float) -> None:
    return None


@contextmanager
def pass_progress(enabled: bool | None, label: str) -> Iterator[Advance]:
    """A context giving an :data:`Advance` callback that drives the bar (or does nothing)."""
    console = _console(enabled)
    if console is None:
        yield _ignore
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn(label),
        TextColumn("{task.fields[samples]} samples  {task.fields[worst]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None, samples=0, worst="")

        def advance(samples: int, worst: float) -> None:
            shown = "" if math.isinf(worst) else f"worst rel. s.e. {worst:.3g}"
            bar.update(task, samples=samples, worst=shown)

        yield advance


def _console(enabled: bool | None) -> Any:
    if enabled is False:
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console(stderr=True)
    return console if enabled or console.is_terminal else None
