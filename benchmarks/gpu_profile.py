"""Where an iteration's GPU time goes: kernel time by kind and the time the GPU sat idle.

``record`` runs a function under ``torch.profiler`` (CUDA activity only, to keep the profiler's
own host overhead small) and ``summarize`` turns the kernels it saw into: the wall time, the
time at least one kernel was running (the union of the kernel intervals: overlapping kernels on
several streams count once), the idle rest (the GPU waiting for the host to launch work, or
for a synchronisation), the kernel time by kind (matrix products, attention, Triton kernels,
communication, other element-wise work) and the largest kernels by name. The profiler adds a
little launch overhead of its own, so idle time is slightly overstated.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("communication", re.compile(r"nccl|allreduce|all_reduce|reduce_scatter|allgather", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|\bmm\b", re.I)),
    ("triton", re.compile(r"^triton|_kernel$", re.I)),
)


def kind_of(name: str) -> str:
    """The kind of a kernel from its name (``KINDS`` in order, else "elementwise / other")."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "elementwise / other"


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize(kernels: list[tuple[str, float, float]], wall_us: float, top: int = 15) -> dict[str, Any]:
    """Summary of ``kernels`` (``(name, start_us, end_us)``) over an iteration of ``wall_us``.

    Returns ``wall_ms``, ``gpu_busy_ms`` (union of kernel intervals), ``idle_fraction``
    (1 - busy / wall), ``kernel_count``, ``by_kind`` (kind -> summed kernel ms and count) and
    ``top_kernels`` (the ``top`` names with the most summed time: ms, count, kind).
    """
    busy = busy_time([(s, e) for _, s, e in kernels])
    by_kind: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        for table, key in ((by_kind, kind_of(name)), (by_name, name)):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += end - start
            entry[1] += 1
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms": wall_us / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "idle_fraction": 1.0 - busy / wall_us if wall_us > 0 else 0.0,
        "kernel_count": len(kernels),
        "by_kind": {k: {"ms": v[0] / 1e3, "count": v[1]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": n[:160], "ms": v[0] / 1e3, "count": v[1], "kind": kind_of(n)} for n, v in names],
    }


def record(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` once under the CUDA profiler and return ``summarize`` of its kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = [
        (evt.name, evt.time_range.start, evt.time_range.end)
        for evt in prof.events()
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.time_range.end > evt.time_range.start
    ]
    return summarize(kernels, wall_us)


def export_trace(fn: Callable[[], Any], path: str) -> None:
    """Run ``fn`` once under the profiler (CPU and CUDA activity) and write a gzipped Chrome trace
    to ``path`` (``.json.gz``): to find which host work the GPU's idle gaps line up with."""
    import gzip
    import os
    import shutil
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def idle_gaps(trace_events: list[dict], top: int = 20) -> dict[str, Any]:
    """The GPU's idle gaps in a Chrome trace (``export_trace``) and the host work beside them.

    ``trace_events``: the trace's ``traceEvents``. Kernels (``cat`` "kernel") give the busy
    intervals; each gap between them is counted by size (<= 10 us, 10-100 us, > 100 us) and,
    for gaps over 100 us, attributed to the names of the host ops (``cat`` "cpu_op" or
    "cuda_runtime") that cover more than half of the gap (up to three, the longest first; ""
    when none does). Returns ``span_ms`` (first kernel start to last kernel end), ``idle_ms``,
    ``gaps`` (by size: count and ms) and ``long_gaps_by_host_op`` (the ``top`` largest:
    ``{"host_ops", "ms", "gaps"}``).
    """
    import bisect

    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace_events if e.get("cat") == "kernel")
    host = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace_events
                  if e.get("cat") in ("cpu_op", "cuda_runtime") and "dur" in e)
    host_starts = [h[0] for h in host]
    longest_host = max((h[1] - h[0] for h in host), default=0.0)
    sizes = {"<=10us": [0, 0.0], "10-100us": [0, 0.0], ">100us": [0, 0.0]}
    by_ops: dict[str, list[float]] = {}
    end = kernels[0][1] if kernels else 0.0
    for start, stop in kernels[1:]:
        if start > end:
            gap = start - end
            size = "<=10us" if gap <= 10 else "10-100us" if gap <= 100 else ">100us"
            sizes[size][0] += 1
            sizes[size][1] += gap
            if size == ">100us":
                covering: dict[str, float] = {}
                i = bisect.bisect_left(host_starts, end - longest_host)
                for h_start, h_end, name in host[i:]:
                    if h_start >= start:
                        break
                    overlap = min(start, h_end) - max(end, h_start)
                    if overlap > 0.5 * gap:
                        covering[name] = max(covering.get(name, 0.0), overlap)
                key = ", ".join(sorted(covering, key=lambda n: -covering[n])[:3])
                entry = by_ops.setdefault(key, [0.0, 0])
                entry[0] += gap
                entry[1] += 1
        end = max(end, stop)
    span = (kernels[-1][1] if kernels else 0.0) - (kernels[0][0] if kernels else 0.0)
    ranked = sorted(by_ops.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "span_ms": span / 1e3,
        "idle_ms": sum(v[1] for v in sizes.values()) / 1e3,
        "gaps": {k: {"count": v[0], "ms": v[1] / 1e3} for k, v in sizes.items()},
        "long_gaps_by_host_op": [{"host_ops": k, "ms": v[0] / 1e3, "gaps": v[1]} for k, v in ranked],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A text table of ``summarize``'s result."""
    lines = [f"wall {summary['wall_ms']:.1f} ms, GPU busy {summary['gpu_busy_ms']:.1f} ms "
             f"(idle {summary['idle_fraction'] * 100:.1f}%), {summary['kernel_count']} kernels"]
    for kind, row in summary["by_kind"].items():
        lines.append(f"  {row['ms']:9.1f} ms  {row['count']:6d}  {kind}")
    lines.append("  largest kernels:")
    for row in summary["top_kernels"]:
        lines.append(f"  {row['ms']:9.1f} ms  {row['count']:6d}  [{row['kind']}] {row['name'][:110]}")
    return "\n".join(lines)


def main() -> None:
    """``python benchmarks/gpu_profile.py TRACE.json.gz``: ``idle_gaps`` of a trace, as JSON."""
    import gzip
    import json
    import sys

    with gzip.open(sys.argv[1], "rt") as f:
        print(json.dumps(idle_gaps(json.load(f)["traceEvents"]), indent=1))


if __name__ == "__main__":
    main()
