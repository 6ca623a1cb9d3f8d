"""What a comparison returns, and how it is printed: tables, goals and their verdicts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Goal:
    """A target for one measured number: ``value <= limit`` (or ``>=`` if not ``at_most``).

    ``full_size_only`` says why the goal means something at the full run's sizes only, when
    the run's sizes make a miss expected (empty: the goal holds at the run's sizes)."""

    text: str
    value: float
    limit: float
    at_most: bool = True
    full_size_only: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"

    @property
    def expected_miss(self) -> bool:
        """Missed, as the run's sizes make expected (see ``full_size_only``)."""
        return not self.passed and bool(self.full_size_only)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "verdict": self.verdict}


@dataclass
class Table:
    """Rows of cells under column headings; numbers are formatted when printed."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class Result:
    """One comparison: its settings, raw numbers (``data``), tables, goals and notes."""

    key: str
    title: str
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "settings": self.settings,
            "data": self.data,
            "tables": [t.to_dict() for t in self.tables],
            "goals": [g.to_dict() for g in self.goals],
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }


def fmt(value: Any) -> str:
    """A cell as text: floats with 3-4 significant digits, small ones in e-notation."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def render_table(table: Table) -> str:
    """``table`` as aligned plain text under its title."""
    cells = [[fmt(c) for c in row] for row in table.rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(table.columns)]
    line = "  ".join(h.ljust(w) for h, w in zip(table.columns, widths, strict=True))
    out = [table.title, line, "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(out)


def render_goal(goal: Goal) -> str:
    sign = "<=" if goal.at_most else ">="
    return f"  [{goal.verdict}] {goal.text}: {fmt(goal.value)} (goal {sign} {fmt(goal.limit)})"


def render(result: Result) -> str:
    """A comparison as the printer shows it: title, settings, tables, goals, notes."""
    parts = [f"== {result.key}) {result.title}  ({result.seconds:.0f} s)"]
    if result.settings:
        parts.append("   " + ", ".join(f"{k}={fmt(v)}" for k, v in result.settings.items()))
    parts.extend(render_table(table) for table in result.tables)
    if result.goals:
        parts.append("Goals:\n" + "\n".join(render_goal(g) for g in result.goals))
    parts.extend(f"Note: {note}" for note in result.notes)
    return "\n\n".join(parts)


def render_machine(machine: dict[str, Any]) -> str:
    """The machine description, one ``key: value`` per line."""
    return "\n".join(f"{key}: {value}" for key, value in machine.items())
