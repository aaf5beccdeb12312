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
