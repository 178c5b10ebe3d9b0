"""Figures, their targets, the printed table and its JSON form.

A target is informational: the table says whether it is met, nothing ever fails on it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Row", "Target", "WorkloadResult", "percentile", "print_table", "write_json"]

Comparison = Literal["ratio<=", "ratio>=", "value<=", "value>="]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The value at fraction ``q`` of ``sorted_values``, picked as the floor programs do."""
    if not sorted_values:
        return math.nan
    return sorted_values[int(q * (len(sorted_values) - 1))]


@dataclass(frozen=True)
class Target:
    """What a figure should reach: a ratio to the floor, or an absolute value."""

    comparison: Comparison
    bound: float

    def text(self, unit: str) -> str:
        """The target as the table shows it, e.g. '<= 1.3x floor' or '>= 200 conn/s'."""
        op = "<=" if self.comparison.endswith("<=") else ">="
        if self.comparison.startswith("ratio"):
            return f"{op} {self.bound:g}x floor"
        return f"{op} {self.bound:g} {unit}"

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """True or False when the figure it needs was measured, else None."""
        subject = ratio if self.comparison.startswith("ratio") else value
        if subject is None or math.isnan(subject):
            return None
        return subject <= self.bound if self.comparison.endswith("<=") else subject >= self.bound


@dataclass
class Row:
    """One figure of one workload, for drainbus and for its floor."""

    figure: str
    unit: str
    drainbus: float | None
    floor: float | None = None
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """drainbus / floor, when both were measured."""
        if self.drainbus is None or not self.floor:
            return None
        return self.drainbus / self.floor

    def as_json(self) -> dict[str, Any]:
        """The row with its ratio and target verdict, for ``--json``."""
        return {
            "figure": self.figure,
            "unit": self.unit,
            "drainbus": self.drainbus,
            "floor": self.floor,
            "ratio": self.ratio,
            "target": self.target.text(self.unit) if self.target else None,
            "target_met": self.target.met(self.drainbus, self.ratio) if self.target else None,
            "note": self.note,
        }


@dataclass
class WorkloadResult:
    """A workload's outcome: measured rows, or why there are none.

    ``has_floor`` is False for a workload without a floor program: its rows are judged
    against their targets only, and the table says "none" where the floor would be.
    """

    name: str
    title: str
    status: Literal["measured", "failed", "not measured yet", "skipped"] = "measured"
    has_floor: bool = True
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """The workload for ``--json``."""
        data = asdict(self)
        data["rows"] = [row.as_json() for row in self.rows]
        return data


def _number(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if unit == "s":
        return f"{value:.3f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def print_table(results: Sequence[WorkloadResult]) -> None:
    """Print every workload's figures as one aligned table, then the notes."""
    header = ("figure", "drainbus", "floor", "ratio", "target", "met")
    lines: list[tuple[str, ...]] = [header]
    for result in results:
        if result.status != "measured":
            reason = result.error or result.status
            lines.append((f"{result.title}: {reason}", "", "", "", "", ""))
            continue
        for row in result.rows:
            met = row.target.met(row.drainbus, row.ratio) if row.target else None
            ratio = row.ratio
            lines.append(
                (
                    f"{row.figure} ({row.unit})",
                    _number(row.drainbus, row.unit),
                    _number(row.floor, row.unit) if result.has_floor else "none",
                    "-" if ratio is None else f"{ratio:.2f}x",
                    row.target.text(row.unit) if row.target else "",
                    {True: "yes", False: "NO", None: ""}[met],
                )
            )
    widths = [max(len(line[i]) for line in lines if line[1:] != ("",) * 5) for i in range(6)]
    for index, line in enumerate(lines):
        if line[1:] == ("",) * 5:  # a workload without figures: one free-running line
            print(line[0])
            continue
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))
    notes = [f"{r.title}: {note}" for r in results for note in r.notes]
    notes += [f"{r.title}, {row.figure}: {row.note}" for r in results for row in r.rows if row.note]
    if notes:
        print()
        for note in notes:
            print(f"* {note}")


def write_json(path: Path, meta: dict[str, Any], results: Sequence[WorkloadResult]) -> None:
    """Write the run's metadata and every workload's rows as one JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "workloads": {r.name: r.as_json() for r in results}}
    path.write_text(json.dumps(document, indent=2) + "\n")
