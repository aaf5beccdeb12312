"""The source lines (or SASS instructions) with the most warp-stall samples in an Nsight Compute
source-page CSV (``ncu --import R --page source --csv --print-source cuda`` or ``sass``), with
each one's largest reasons, after the samples' shares by reason.

    python benchmarks/sweeps/stall_lines.py stalls.csv [TOP]
"""

from __future__ import annotations

import csv
import sys


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> int:
    """Prints the report; returns 1 (the exit status) where the CSV has no stall samples."""
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    head_at = next((i for i, r in enumerate(rows) if any("Stall Sampling" in c for c in r)), None)
    if head_at is None:
        print(f"{path}: no stall-sampling column; first rows:", *rows[:3], sep="\n")
        return 1
    head, body = rows[head_at], rows[head_at + 1 :]
    total_col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))
    source_col = head.index("Source") if "Source" in head else 1  # the CUDA line or the SASS instruction
    reason_cols = [i for i, c in enumerate(head) if c.startswith("stall_") and "(Not Issued)" not in c]
    total = sum(_number(r[total_col]) for r in body if len(r) > total_col) or 1.0
    ranked = sorted((r for r in body if len(r) > total_col), key=lambda r: -_number(r[total_col]))
    print(f"{len(body)} lines, {total:.0f} samples")
    by_reason = sorted(((sum(_number(r[i]) for r in body if len(r) > i), head[i]) for i in reason_cols), reverse=True)
    print("by reason: " + ", ".join(f"{name[6:]} {100 * value / total:.1f}%" for value, name in by_reason[:8]))
    for r in ranked[:top]:
        reasons = sorted(((_number(r[i]), head[i]) for i in reason_cols), reverse=True)[:3]
        why = ", ".join(f"{name} {value:.0f}" for value, name in reasons if value)
        print(f"{100 * _number(r[total_col]) / total:5.1f}%  {r[source_col].strip()[:90]}  [{why}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
