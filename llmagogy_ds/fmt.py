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


def text_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


__all__ = ["num", "pct", "text_table"]
