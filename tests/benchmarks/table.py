"""The one table every benchmark prints: rows of (name, ours, baseline, ratio, note)."""

from __future__ import annotations

import os

HEADER = ("benchmark", "ours (median)", "baseline (median)", "ratio", "note")


def print_table(rows: list[tuple], repeat: int) -> None:
    widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for r in [HEADER, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\nmachine: {os.cpu_count()} cores; medians of {repeat} run(s)")
