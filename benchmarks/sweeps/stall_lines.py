"""The source lines with the most warp-stall samples in an Nsight Compute source-page CSV
(``ncu --import R --page source --csv --print-source cuda``), with each line's largest reasons.

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


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    head_at = next((i for i, r in enumerate(rows) if any("Stall Sampling" in c for c in r)), None)
    if head_at is None:
        print(f"{path}: no stall-sampling column; first rows:", *rows[:3], sep="\n")
        return
    head, body = rows[head_at], rows[head_at + 1 :]
    total_col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))
    source_col = next((i for i, c in enumerate(head) if c in ("Source", "Address")), 1)
    reason_cols = [i for i, c in enumerate(head) if c.startswith("stall_") or "stalled" in c.lower()]
    total = sum(_number(r[total_col]) for r in body if len(r) > total_col) or 1.0
    ranked = sorted((r for r in body if len(r) > total_col), key=lambda r: -_number(r[total_col]))
    print(f"{len(body)} lines, {total:.0f} samples; columns: {len(head)}")
    for r in ranked[:top]:
        reasons = sorted(((_number(r[i]), head[i]) for i in reason_cols), reverse=True)[:3]
        why = ", ".join(f"{name} {value:.0f}" for value, name in reasons if value)
        line = r[0] if source_col != 0 else ""
        print(f"{100 * _number(r[total_col]) / total:5.1f}%  {line:>5} {r[source_col].strip()[:90]}  [{why}]")


if __name__ == "__main__":
    main()
