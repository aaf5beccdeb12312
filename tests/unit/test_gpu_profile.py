"""benchmarks/gpu_profile.py: busy time as the union of kernel intervals, and the grouping.

Reference for the union: a brute-force count over integer time steps.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests._modules import load_file_module

gp = load_file_module("gpu_profile", Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_profile.py")


def test_busy_time_is_the_union_of_intervals():
    rng = random.Random(0)
    for _ in range(20):
        intervals = []
        for _ in range(rng.randint(1, 30)):
            start = rng.randint(0, 200)
            intervals.append((start, start + rng.randint(1, 40)))
        covered = {t for s, e in intervals for t in range(s, e)}
        assert gp.busy_time(intervals) == len(covered)
    assert gp.busy_time([]) == 0


def test_summarize_groups_by_kind_and_name():
    kernels = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 0.0, 300.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 300.0, 500.0),  # touching: one busy stretch
        ("flash_fwd_kernel", 450.0, 600.0),                  # overlaps the gemm (another stream)
        ("triton_per_fused_mul_silu_0", 800.0, 850.0),
        ("vectorized_elementwise_kernel<add>", 900.0, 910.0),
    ]
    out = gp.summarize(kernels, wall_us=1000.0, top=2)
    assert out["gpu_busy_ms"] == (600 + 50 + 10) / 1e3
    assert abs(out["idle_fraction"] - 0.34) < 1e-12
    assert out["by_kind"]["matmul"] == {"ms": 0.5, "count": 2}
    assert out["by_kind"]["attention"]["count"] == 1
    assert out["by_kind"]["triton"]["ms"] == 0.05
    assert out["by_kind"]["elementwise / other"]["count"] == 1
    assert [k["name"] for k in out["top_kernels"]] == ["sm90_xmma_gemm_bf16bf16_bf16f32", "flash_fwd_kernel"]


def test_idle_gaps_sizes_and_host_attribution():
    kernels = [(0, 100), (105, 200), (250, 300), (600, 700), (690, 900), (1100, 1200)]
    events = [{"cat": "kernel", "ts": s, "dur": e - s, "name": "k"} for s, e in kernels]
    events += [
        {"cat": "cuda_runtime", "ts": 280, "dur": 330, "name": "cudaStreamSynchronize"},  # covers gap 300-600
        {"cat": "cpu_op", "ts": 310, "dur": 100, "name": "aten::item"},                # a third of it: not counted
        {"cat": "cpu_op", "ts": 880, "dur": 200, "name": "LinearForward"},              # covers gap 900-1100
        {"cat": "python_function", "ts": 0, "dur": 5000, "name": "ignored"},
    ]
    out = gp.idle_gaps(events)
    assert out["span_ms"] == 1.2
    assert out["gaps"]["<=10us"] == {"count": 1, "ms": 0.005}
    assert out["gaps"]["10-100us"] == {"count": 1, "ms": 0.05}
    assert out["gaps"][">100us"] == {"count": 2, "ms": 0.5}
    assert out["idle_ms"] == 0.555
    assert out["long_gaps_by_host_op"] == [
        {"host_ops": "cudaStreamSynchronize", "ms": 0.3, "gaps": 1},
        {"host_ops": "LinearForward", "ms": 0.2, "gaps": 1},
    ]
