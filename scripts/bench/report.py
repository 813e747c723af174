"""What a scenario returns (a Result: its figures, its targets against the peers, its notes) and how it is printed.

Nothing here measures: a Result can be rendered again, or by something else, without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WIDTH = 112


@dataclass
class Figure:
    """One measured line: a rate (already with its unit), wall seconds, peak RSS, and what to know about it."""

    label: str
    rate: str = ""
    wall: float | None = None
    rss_mb: float | None = None
    note: str = ""


@dataclass
class Target:
    """Ours against a peer (ratio) or against a goal alone; met is None when the run was incomplete (no verdict)."""

    name: str
    ours: str
    goal: str
    met: bool | None
    peer: str = ""
    ratio: str = ""


@dataclass
class Result:
    """What one scenario measured."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # method, and what is unfair in each direction
    details: list[str] = field(default_factory=list)  # CPU, stages, profiles: for whoever digs further
    skipped: str = ""  # why nothing was measured (a peer not installed)


def rate(value: float | None, unit: str = "/s") -> str:
    if value is None:
        return "-"
    return (f"{value:,.0f}" if value >= 100 else f"{value:,.1f}") + unit


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def mark(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT MET")


def _cell(text: str, width: int, right: bool = True) -> str:
    return text.rjust(width) if right else text.ljust(width)


def figure_lines(figures: list[Figure]) -> list[str]:
    lines = [f"{'':<42} {'figure':>18} {'wall s':>8} {'peak RSS':>9}  notes", "-" * WIDTH]
    for f in figures:
        wall = "" if f.wall is None else f"{f.wall:.2f}"
        rss = "" if f.rss_mb is None else f"{f.rss_mb:.0f} MB"
        lines.append(f"{_cell(f.label, 42, False)} {f.rate:>18} {wall:>8} {rss:>9}  {f.note}".rstrip())
    return lines


def target_lines(targets: list[Target]) -> list[str]:
    lines = [f"{'target':<40} {'ours':>16} {'peer':>26} {'ratio':>8} {'goal':>10}  status", "-" * WIDTH]
    for t in targets:
        lines.append(
            f"{_cell(t.name, 40, False)} {t.ours:>16} {t.peer:>26} {t.ratio:>8} {t.goal:>10}  {mark(t.met)}"
        )
    return lines


def render(result: Result) -> str:
    lines = ["", result.title, "=" * WIDTH]
    if result.skipped:
        lines.append(f"skipped: {result.skipped}")
        return "\n".join(lines)
    if result.figures:
        lines += figure_lines(result.figures)
    if result.targets:
        lines += ["", *target_lines(result.targets)]
    if result.notes:
        lines += [""] + [f"note: {n}" for n in result.notes]
    if result.details:
        lines += [""] + result.details
    return "\n".join(lines)


def summary(results: list[Result], header: str) -> str:
    """Every target of every scenario in one table: ours, the peer, the ratio, the goal, met or not."""
    lines = ["", f"Summary: every target, side by side with the peers; {header}", "=" * WIDTH]
    lines.append(f"{'scenario':<10} " + target_lines([])[0])
    lines.append("-" * WIDTH)
    for result in results:
        if result.skipped:
            lines.append(f"{result.name:<10} skipped: {result.skipped}")
        for line in target_lines(result.targets)[2:]:
            lines.append(f"{result.name:<10} {line}")
    return "\n".join(lines)
