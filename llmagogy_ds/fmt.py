"""Numbers and tables for people: one way to print a loss, a share, a count of FLOPs or a duration."""
from __future__ import annotations

import math


def num(v, fmt="{:.4f}") -> str:
    """``v`` formatted, or "-" for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def pct(v) -> str:
    return num(v, "{:.1%}")


def si(x: float | None, unit: str = "", *, billion: str = "G", missing: str = "-") -> str:
    """``x`` with an SI prefix, 3 significant digits: 1.2P, or "1.2 PFLOPs" with a unit.

    ``billion="B"`` prints counts (parameters, tokens) as 1.02B instead of 1.02G.
    """
    if x is None:
        return missing
    sep = " " if unit else ""
    for div, prefix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{sep}{prefix}{unit}"
    return f"{x:.3g}{sep}{unit}"


def duration(seconds: float | None, missing: str = "-") -> str:
    """A wall time in the largest unit that keeps it readable: 12 s, 3.5 min, 19.0 h, 2.5 d."""
    if seconds is None:
        return missing
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def text_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table (report.md)."""
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


__all__ = ["num", "pct", "si", "duration", "text_table", "md_table"]
