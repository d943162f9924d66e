"""Does a loaded run tell the same story as a quiet one? Compare the ratios of two cg4ctr-bench JSON files.

    python bench/compare_runs.py QUIET.json LOADED.json

For every row with a ratio to diffusers (matched by name and group count) it prints a markdown table: the
quiet ratio, the loaded ratio with its stated noise (the min-max of its per-round ratios) and flags, and a
verdict: "within noise" when the quiet ratio lies inside the loaded run's min-max, "flagged noisy" when it
does not but the loaded run flagged that ratio noisy, else "MISLEADING" (exit status 1). Exit 2 on a file
that cannot be read.
"""
from __future__ import annotations

import json
import sys
from typing import Any


def _rows(report: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["name"], int(r["groups"])): r for r in report["results"] if r.get("ratio_range")}


def verdict(quiet: dict[str, Any], loaded: dict[str, Any]) -> str:
    """'within noise', 'flagged noisy' or 'MISLEADING' for one row of each run (see the module docstring)."""
    lo, hi = loaded["ratio_range"]
    if lo <= quiet["ratio_vs_diffusers"] <= hi:
        return "within noise"
    if "noisy" in loaded.get("ratio_flags", []):
        return "flagged noisy"
    return "MISLEADING"


def compare(quiet: dict[str, Any], loaded: dict[str, Any]) -> tuple[list[str], bool]:
    """Markdown lines and whether every shared row is within noise or flagged."""
    q, ld = _rows(quiet), _rows(loaded)
    lines = ["| row | groups | quiet ratio [min-max] | loaded ratio [min-max] | loaded flags | verdict |",
             "|---|---:|---:|---:|---|---|"]
    ok = True
    for key in q:
        if key not in ld:
            continue
        a, b = q[key], ld[key]
        v = verdict(a, b)
        ok = ok and v != "MISLEADING"
        lines.append(
            f"| {key[0]} | {key[1]} | {a['ratio_vs_diffusers']:.2f}× [{a['ratio_range'][0]:.2f}–{a['ratio_range'][1]:.2f}] "
            f"| {b['ratio_vs_diffusers']:.2f}× [{b['ratio_range'][0]:.2f}–{b['ratio_range'][1]:.2f}] "
            f"| {', '.join(b.get('ratio_flags', [])) or '–'} | {v} |")
    return lines, ok


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2:
        print("compare_runs.py: error: usage: compare_runs.py QUIET.json LOADED.json", file=sys.stderr)
        return 2
    reports = []
    for path in argv:
        try:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as exc:
            print(f"compare_runs.py: error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    lines, ok = compare(*reports)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
