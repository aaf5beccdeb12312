"""Output layer + distillation loss, forward + backward: floor, reference, fused, Liger.

For each case (bf16, teacher without grad) it times side by side in one process:

* ``floor``: the four bare matrix products any method must do (student logits, teacher logits,
  grad wrt student hidden, grad wrt student weight);
* ``reference``: full logits + ``losses.reference.distill_loss`` (fp32 inside), autograd;
* ``fused``: ``losses.fused_linear_distill_loss`` (automatic chunking, plus ``--sweep``
  configurations);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (jsd, beta 0.5) when importable.

Time is the median over repeats of CUDA-event-timed calls; memory is the peak allocated during
one call minus the inputs alone (the gradients the call produces count). ``--interleave R``
times the floor and the fused variants in R rounds of random order, each against its round's
floor; on a power-capped GPU add ``--batch 8 --host-ahead``, which times each method in its own
steady state (one call per turn lets the floor run after a cooler fused call:
NOTES_loss_kernel.md, iteration 25).

    python benchmarks/loss_kernel.py [--sweep] [--kernel-sweep] [--gemm-sweep] [--out DIR]
    python benchmarks/loss_kernel.py --cases T8k_V152k --interleave 40 --batch 8 --host-ahead
    ncu ... python benchmarks/loss_kernel.py --profile-kernels
    torchrun --nproc-per-node 2 benchmarks/loss_kernel.py --tp 2

With ``--tp 2`` each rank holds V/2 vocab rows of both output layers (same global shapes) and the
per-GPU time is reported, next to the TP=1 fused time measured on each GPU alone.
Writes ``loss_kernel_<device>_<date>[_tp2].json`` and ``.md`` to ``--out``
(default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_profile  # noqa: E402  (benchmarks/, the script's directory)

from megatron_distill.losses import distill_loss, fused_linear_distill_loss  # noqa: E402
from megatron_distill.losses.fused import plan_chunks, uses_single_pass  # noqa: E402
from megatron_distill.losses.kernels import distill_elementwise as ew  # noqa: E402

CASES = {
    "T8k_V152k": dict(T=8192, h_s=2048, h_t=4096, V=151936),
    "T16k_V128k": dict(T=16384, h_s=4096, h_t=8192, V=128256),
}
KINDS = {"jsd": 0.5, "forward_kl": 0.5}
GIB = 1 << 30
# (chunk_tokens, teacher_chunk_tokens, element-wise kernel config overrides): for --sweep.
# Memory (case 1): peak extra ~0.61 GiB (gradients) + (C + C_t) * 0.283 MiB, so C + C_t <= 2293
# keeps within Liger's 1.26 GiB. The default path at TP = 1 is the single pass; the rows with
# single_pass=True / False time each kind on both paths; sp_* set a single-pass launch setting for both kinds
# (defaults: ew.SP_DEFAULTS, per kind). (Chunk lengths tuned to cuBLAS's tiles, iteration 8, and
# the overlapped loop, iteration 9, were swept at commits e1a7a5a and 3c47445.)
_SINGLE = {"single_pass": True, "sp_variant": "reread"}
_CLUSTER = {"single_pass": True, "sp_variant": "cluster"}
_MULTI = {"single_pass": False}
SWEEP = {
    "T8k_V152k": [
        (None, None, _SINGLE),
        (None, None, _CLUSTER),
        (None, None, _MULTI),
        (1024, 1024, _SINGLE),  # equal halves of the automatic buffers (the single pass's plan before iteration 14)
        (1536, 768, {}),  # half again the teacher sub-chunk: Liger's memory (1.264 GiB), not less
        (4096, 4096, {}),
    ],
    "T16k_V128k": [
        (None, None, _SINGLE),
        (None, None, _CLUSTER),
        (None, None, _MULTI),
        (2048, 2048, _SINGLE),
        (4096, 4096, {}),
    ],
}
# (block_v, num_warps, num_stages, programs_per_sm): for --kernel-sweep (multi-pass kernels)
KERNEL_SWEEP = [
    (4096, 8, 3, 16),
    (4096, 8, 4, 16),
    (2048, 4, 3, 16),
]
# (variant, block_v, num_warps, num_stages, programs_per_sm, segments): --kernel-sweep, single pass.
SP_SWEEP = [
    # cluster_single_pass.cu: num_warps sets its block size (default 8 warps), nothing else applies
    ("cluster", None, None, None, None, None),
    ("cluster", None, 16, None, None, None),
    ("reread", 2048, 4, 3, 4, 16),
    ("reread", 1024, 4, 3, 8, 16),
    ("pipelined", 1024, 4, 3, 6, 24),
    ("pipelined", 2048, 4, 3, 4, 16),
    # segments per row around the defaults (iteration 14: 512-row teacher sub-chunks)
    ("reread", 2048, 4, 3, 4, 8),
    ("reread", 2048, 4, 3, 4, 24),
    ("reread", 2048, 4, 3, 4, 32),
    ("reread", 1024, 4, 3, 8, 24),
    ("reread", 1024, 4, 3, 8, 32),
]
LAUNCHES = 10  # kernel-level timings: back-to-back launches per timed call (hides host overhead)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def timed(fn, reps: int, warmup: int, group=None) -> list[float]:
    """Milliseconds per call (CUDA events), fixed repeat count so TP ranks stay in step."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def timed_batch(fn, calls: int, host_ahead: bool, group=None) -> float:
    """Milliseconds per call over calls 2..``calls`` of ``calls`` calls back to back: the first
    call carries the GPU's power and clock state from whatever ran before it, and is left out.
    ``host_ahead``: no host synchronization between the calls (events recorded after each), so
    the host enqueues while the GPU works, as in a training step; otherwise each call is timed
    as ``timed`` times it, starting on a GPU with nothing queued."""
    if not host_ahead:
        return statistics.mean(timed(fn, calls, 0, group)[1:])
    if group is not None:
        dist.barrier(group)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for event in events:
        fn()
        event.record()
    torch.cuda.synchronize()
    return events[0].elapsed_time(events[-1]) / (calls - 1)


def peak_extra_gib(fn, clear) -> float:
    """Peak allocated during one call minus the inputs alone, in GiB (gradients included).

    ``fn`` runs once first (compilation, allocator warm-up); ``clear`` then drops the inputs'
    gradients so that the baseline holds the inputs only.
    """
    fn()
    clear()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def make_inputs(case: dict, v_lo: int, v_hi: int, seed: int = 0):
    """bf16 hidden states and this rank's rows [v_lo, v_hi) of both output layers."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(torch.bfloat16)

    h = randn(case["T"], case["h_s"])
    ht = randn(case["T"], case["h_t"])
    # full weights drawn identically on every rank, then sliced: logits std ~2
    w = randn(case["V"], case["h_s"], std=2.0 / case["h_s"] ** 0.5)[v_lo:v_hi].contiguous()
    wt = randn(case["V"], case["h_t"], std=2.0 / case["h_t"] ** 0.5)[v_lo:v_hi].contiguous()
    torch.cuda.empty_cache()
    return h.requires_grad_(), w.requires_grad_(), ht, wt


def _clear(*ts):
    for t in ts:
        t.grad = None


def make_methods(h, w, ht, wt, group, sp_inputs=None):
    def floor():
        zs = h.detach() @ w.detach().T
        zt = ht @ wt.T
        zs @ w.detach()
        zs.T @ h.detach()
        del zt

    def reference(kind):
        def fn():
            _clear(h, w)
            zs = h @ w.T
            with torch.no_grad():
                zt = ht @ wt.T
            distill_loss(zs, zt, kind, beta=KINDS[kind], tp_group=group).backward()

        return fn

    def fused(kind, **kw):
        def fn():
            _clear(h, w)
            fused_linear_distill_loss(h, w, ht, wt, kind, beta=KINDS[kind], tp_group=group, **kw).backward()

        return fn

    def fused_sp(kind):
        hl, htl = sp_inputs

        def fn():
            _clear(hl, w)
            fused_linear_distill_loss(
                hl, w, htl, wt, kind, beta=KINDS[kind], tp_group=group, sequence_parallel=True
            ).backward()

        return fn

    return floor, reference, fused, fused_sp


def liger_fn(h, w, ht, wt):
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception as exc:  # any import failure means "not available"
        return None, f"liger not importable: {exc!r}"
    module = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

    def fn():
        _clear(h, w)
        module(h, w, ht, wt, None).backward()  # shift_labels=None must be positional

    return fn, None


def _timing_fields(times: list[float]) -> dict:
    """A row's timing entries from its per-call milliseconds."""
    return dict(ms_median=round(statistics.median(times), 3), ms_min=round(min(times), 3),
                ms_all=[round(x, 3) for x in times])


def _log_row(row: dict) -> None:
    log(f"  {row['method']:<48} {row.get('ms_median', row.get('error'))!s:>10} ms  "
        f"{row.get('peak_extra_gib', '-')} GiB")


def measure(name, fn, reps, warmup, group, extra=None, clear=lambda: None):
    row = dict(method=name, **(extra or {}))
    try:
        row["peak_extra_gib"] = round(peak_extra_gib(fn, clear), 3)
        row.update(_timing_fields(timed(fn, reps, warmup, group)))
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exc:  # record it and go on with the other methods
        row["error"] = repr(exc)[:300]
    gc.collect()
    torch.cuda.empty_cache()
    _log_row(row)
    return row


@contextlib.contextmanager
def kernel_config(overrides: dict):
    """ew.KERNEL_CONFIG with ``overrides`` applied, restored on exit."""
    saved = dict(ew.KERNEL_CONFIG)
    ew.KERNEL_CONFIG.update(overrides)
    try:
        yield
    finally:
        ew.KERNEL_CONFIG.clear()
        ew.KERNEL_CONFIG.update(saved)


def measure_interleaved(methods, rounds: int, warmup: int, group, clear, batch: int = 1,
                        host_ahead: bool = False) -> list[dict]:
    """Like ``measure`` for each of ``methods`` ((label, fn, extra, kernel overrides)), but timed
    in ``rounds`` rounds that call every method once in turn, so that a drift of the GPU's speed
    during the run (clocks, temperature) reaches all methods alike. Each round calls the methods
    in a new random order (seeded): with a fixed order, the method called right after the floor
    (pure GEMMs) measured ~0.025x of the floor slower than the same configuration called later
    in the round (NOTES iteration 12). With ``batch`` > 1 each turn is ``batch`` calls of the
    method back to back, timed by ``timed_batch`` (``host_ahead`` as there): the per-call cost of
    running one method steadily. Peak memory first, per method; then ``warmup`` calls each; rows
    carry ``rounds`` timings each, in round order."""
    rows, live = [], []
    for label, fn, extra, kernel in methods:
        row = dict(method=label, interleaved_rounds=rounds, **extra)
        if batch > 1:
            row.update(calls_per_turn=batch, host_ahead=host_ahead)
        try:
            with kernel_config(kernel):
                row["peak_extra_gib"] = round(peak_extra_gib(fn, clear), 3)
                for _ in range(warmup):
                    fn()
            live.append((row, fn, kernel, []))
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    order = random.Random(0)  # the same on every TP rank, so the ranks stay in step
    for _ in range(rounds):
        for _row, fn, kernel, times in order.sample(live, len(live)):
            with kernel_config(kernel):
                times += timed(fn, 1, 0, group) if batch == 1 else [timed_batch(fn, batch, host_ahead, group)]
    base = live[0][3] if live and live[0][0]["method"].startswith("floor") else None
    for row, _, _, times in live:
        row.update(_timing_fields(times))
        if base is not None and len(times) >= 2:
            row["x_floor_paired"] = paired_ratio(times, base)
    for row in rows:
        _log_row(row)
    return rows


def paired_ratio(times: list[float], base: list[float]) -> list[float]:
    """Median and quartiles of ``times[i] / base[i]`` (the same round's floor): a drift of the
    GPU's speed between rounds cancels in each ratio."""
    q1, q2, q3 = statistics.quantiles([t / b for t, b in zip(times, base, strict=True)], n=4)
    return [round(q2, 4), round(q1, 4), round(q3, 4)]


def check_against_reference(h, w, ht, wt, kind, group):
    """Relative errors of the fused loss and gradients vs the reference (same bf16 inputs)."""
    _clear(h, w)
    zs = h @ w.T
    with torch.no_grad():
        zt = ht @ wt.T
    ref = distill_loss(zs, zt, kind, beta=KINDS[kind], tp_group=group)
    ref.backward()
    del zs, zt
    ref_gh, ref_gw = h.grad.float(), w.grad.float()
    if group is not None:
        # autograd leaves each rank its vocab shard's part of the hidden's gradient (Megatron's
        # column-parallel layer sums them); the fused loss returns the sum
        dist.all_reduce(ref_gh, group=group)
    _clear(h, w)
    torch.cuda.empty_cache()
    loss = fused_linear_distill_loss(h, w, ht, wt, kind, beta=KINDS[kind], tp_group=group)
    loss.backward()

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    out = dict(
        loss_fused=loss.item(),
        loss_reference=ref.item(),
        loss_rel_err=abs(loss.item() - ref.item()) / abs(ref.item()),
        grad_h_rel_err=rel(h.grad, ref_gh),
        grad_w_rel_err=rel(w.grad, ref_gw),
    )
    _clear(h, w)
    return out


def _kernel_cases(zs0, zs, zt, split, kw):
    """name -> (call, logits tensors moved) for one launch configuration."""
    stats = ew.row_stats(zs0, zt, 1.0, False, split=split, **kw)
    loss = torch.empty(split, zs0.shape[0], device=zs0.device)
    kl = ew.jsd_row_sums(zs0, zt, stats, loss, beta=0.5, temperature=1.0, **kw)
    common = dict(temperature=1.0, **kw)
    return {
        "row_stats": (lambda: ew.row_stats(zs0, zt, 1.0, False, split=split, **kw), 2),
        "row_stats(reverse)": (lambda: ew.row_stats(zs0, zt, 1.0, True, split=split, **kw), 2),
        "kl_loss_grad": (lambda: ew.kl_loss_grad_(zs, zt, stats, loss, reverse=False, grad_scale=1.0, **common), 3),
        "jsd_row_sums": (lambda: ew.jsd_row_sums(zs0, zt, stats, loss, beta=0.5, **common), 2),
        "jsd_grad": (lambda: ew.jsd_grad_(zs, zt, stats, kl, beta=0.5, grad_scale=1.0, split=split, **common), 3),
    }


def kernel_sweep(v: int, rows: int = 512):
    """Bandwidth of the element-wise kernels alone (one 512-row teacher sub-chunk)."""
    out = []
    zs0 = torch.randn(rows, v, device="cuda").mul_(2).to(torch.bfloat16)
    zt = torch.randn(rows, v, device="cuda").mul_(2).to(torch.bfloat16)
    zs = zs0.clone()
    unit = rows * v * 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for block_v, num_warps, num_stages, per_sm in KERNEL_SWEEP:
        if True:
            split = max(1, min(triton_cdiv(v, block_v), triton_cdiv(per_sm * sms, rows)))
            kw = dict(block_v=block_v, num_warps=num_warps, num_stages=num_stages)
            for name, (fn, passes) in _kernel_cases(zs0, zs, zt, split, kw).items():
                row = dict(kernel=name, **kw, split=split)
                try:
                    t = statistics.median(timed(fn, 10, 2))
                    row.update(ms=round(t, 4), gbps=round(passes * unit / t / 1e6, 1))
                except Exception as exc:
                    row["error"] = repr(exc)[:99]
                out.append(row)
                log(f"  kernel {name:<20} {kw} split={split} {row.get('gbps')} GB/s")
            zs.copy_(zs0)
    return out


def multi_pass_step(zs: torch.Tensor, zt: torch.Tensor, loss: torch.Tensor, kind: str, split: int, *,
                    beta: float = 0.5, temperature: float = 1.0, grad_scale: float = 1e-4) -> None:
    """The multi-pass element-wise kernels on one chunk (TP=1): statistics, then the loss
    partials into ``loss`` ``[split, rows]`` and dz over ``zs`` ``[rows, V]``."""
    reverse = kind == "reverse_kl"
    stats = ew.row_stats(zs, zt, temperature, reverse, split=split)
    if kind == "jsd":
        kl = ew.jsd_row_sums(zs, zt, stats, loss, beta=beta, temperature=temperature)
        ew.jsd_grad_(zs, zt, stats, kl, beta=beta, temperature=temperature, grad_scale=grad_scale, split=split)
    else:
        ew.kl_loss_grad_(zs, zt, stats, loss, reverse=reverse, temperature=temperature, grad_scale=grad_scale)


def sp_kernel_sweep(v: int, rows: int):
    """The single-pass kernel (stats + loss + dz in one launch) against the multi-pass kernels
    on one chunk of ``rows``; GB/s counts the DRAM minimum (read z_S, z_T, write dz: 3 units)."""
    out = []
    g = torch.Generator(device="cuda").manual_seed(1)
    zs0 = torch.randn(rows, v, device="cuda", generator=g).mul_(2).to(torch.bfloat16)
    zt = torch.randn(rows, v, device="cuda", generator=g).mul_(2).to(torch.bfloat16)
    zs = zs0.clone()
    unit = rows * v * 2
    dev = zs.device

    def multi_pass(kind):
        split = ew.default_split(rows, v, dev)
        loss = torch.empty(split, rows, device=dev)

        def fn():
            multi_pass_step(zs, zt, loss, kind, split)

        return fn

    def single_pass(kind, variant, block_v, num_warps, num_stages, per_sm, segments):
        split = ew.single_pass_split(v, dev, segments, block_v, variant=variant)
        loss = torch.empty(split, rows, device=dev)
        kw = dict(block_v=block_v, num_warps=num_warps, num_stages=num_stages, programs_per_sm=per_sm)

        def fn():
            ew.single_pass_loss_grad_(
                zs, zt, loss, kind=kind, beta=0.5, temperature=1.0, grad_scale=1e-4, variant=variant, **kw
            )

        return fn, split

    def repeat(fn):
        def many():
            for _ in range(LAUNCHES):
                fn()

        return many

    for kind in ("forward_kl", "jsd"):
        variants = [(dict(path="multi-pass"), multi_pass(kind))]
        for variant, block_v, num_warps, num_stages, per_sm, segments in SP_SWEEP:
            fn, split = single_pass(kind, variant, block_v, num_warps, num_stages, per_sm, segments)
            cfg = dict(path=variant, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages, programs_per_sm=per_sm, segments=split)
            variants.append((cfg, fn))
        for cfg, fn in variants:
            zs.copy_(zs0)
            row = dict(kernel=kind, rows=rows, **cfg)
            try:
                t = statistics.median(timed(repeat(fn), 7, 1)) / LAUNCHES
                row.update(ms=round(t, 4), gbps_3units=round(3 * unit / t / 1e6, 1))
            except Exception as exc:
                row["error"] = repr(exc)[:199]
            out.append(row)
            log(f"  {kind:<10} rows={rows} {cfg} {row.get('ms')} ms {row.get('gbps_3units')} GB/s(3 units)")
    return out


def profile_kernels(v: int, rows: int) -> None:
    """A few launches of each element-wise path, for ncu (after a warm-up that compiles): per
    round, KL multi-pass (2 kernels), then each single-pass variant (ew.SP_VARIANTS), then the
    same for JSD (3 multi-pass kernels)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    zs0 = torch.randn(rows, v, device="cuda", generator=g).mul_(2).to(torch.bfloat16)
    zt = torch.randn(rows, v, device="cuda", generator=g).mul_(2).to(torch.bfloat16)
    zs = zs0.clone()
    dev = zs.device
    split = ew.default_split(rows, v, dev)
    loss = torch.empty(split, rows, device=dev)
    for _ in range(2):  # the second round is the one to look at (compiled, occupancy known)
        for kind in ("forward_kl", "jsd"):
            zs.copy_(zs0)
            multi_pass_step(zs, zt, loss, kind, split)
            for variant in ew.SP_VARIANTS:
                sp_loss = torch.empty(ew.single_pass_split(v, dev, kind=kind, variant=variant), rows, device=dev)
                zs.copy_(zs0)
                ew.single_pass_loss_grad_(
                    zs, zt, sp_loss, kind=kind, beta=0.5, temperature=1.0, grad_scale=1e-4, variant=variant
                )
    torch.cuda.synchronize()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


GEMM_ROWS = (384, 512, 640, 1024, 2816, 4096)


def gemm_sweep(case: dict, rows=GEMM_ROWS, libraries=(None,)):
    """Single GEMMs at chunk sizes: logits at M rows, weight-grad accumulation at K rows; with each
    of ``libraries`` (torch.backends.cuda.preferred_blas_library: "cublas" / "cublaslt"; None =
    as configured), and the name of the kernel that ran."""
    out = []
    v, hs, ht_dim = case["V"], case["h_s"], case["h_t"]
    wt = torch.randn(v, ht_dim, device="cuda", dtype=torch.bfloat16)
    ws = torch.randn(v, hs, device="cuda", dtype=torch.bfloat16)
    gw = torch.randn(v, hs, device="cuda", dtype=torch.bfloat16)
    configured = torch.backends.cuda.preferred_blas_library()
    for library in libraries:
        torch.backends.cuda.preferred_blas_library(library or configured)
        for m in rows:
            cases = []
            for name, w, k in (("teacher_logits", wt, ht_dim), ("student_logits", ws, hs)):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                z = torch.empty(m, v, device="cuda", dtype=torch.bfloat16)
                cases.append((name, k, lambda x=x, z=z, w=w: torch.mm(x, w.T, out=z)))
            dz = torch.randn(m, v, device="cuda", dtype=torch.bfloat16)
            xs = torch.randn(m, hs, device="cuda", dtype=torch.bfloat16)
            cases += [
                ("grad_w_addmm_bf16", hs, lambda dz=dz, xs=xs: gw.addmm_(dz.T, xs)),
                ("grad_w_mm_bf16_fresh", hs, lambda dz=dz, xs=xs: torch.mm(dz.T, xs, out=gw)),
                ("grad_h_mm", hs, lambda dz=dz: torch.mm(dz, ws)),
            ]
            for name, k, fn in cases:
                t = statistics.median(timed(fn, 10, 2))
                top = gpu_profile.record(fn)["top_kernels"]
                row = dict(gemm=name, rows=m, library=str(library or configured), ms=round(t, 4),
                           tflops=round(2 * m * v * k / t / 1e9, 1), kernel=top[0]["name"][:80] if top else None)
                out.append(row)
                log(f"  gemm {name:<22} M/K={m:<5} {row['library']:<24} {row['tflops']} TFLOP/s  {row['kernel']}")
            del cases, dz, xs
    torch.backends.cuda.preferred_blas_library(configured)
    return out


def run_case(name, case, args, group, tp, rank):
    v = case["V"]
    v_lo, v_hi = (rank * v // tp, (rank + 1) * v // tp) if tp > 1 else (0, v)
    h, w, ht, wt = make_inputs(case, v_lo, v_hi)
    sp_inputs = None
    if tp > 1:
        block = slice(rank * case["T"] // tp, (rank + 1) * case["T"] // tp)
        sp_inputs = (h.detach()[block].clone().requires_grad_(), ht[block].contiguous())
    floor, reference, fused, fused_sp = make_methods(h, w, ht, wt, group, sp_inputs)
    # as the fused loss plans it (the single pass gives the teacher a quarter of the buffers)
    chunk, teacher_chunk = plan_chunks(
        case["T"], v_hi - v_lo, case["h_s"], 2, h.device, teacher_quarter=uses_single_pass("triton", tp)
    )
    v_local = v_hi - v_lo
    res = dict(case=name, **case, tp=tp, v_local=v_local, auto_chunk=[chunk, teacher_chunk])
    res.update(rows=[], checks={})
    log(f"== {name} {case} tp={tp} V_local={v_local} auto chunk={chunk} teacher sub-chunk={teacher_chunk}")
    r, w_ = args.reps, args.warmup
    def clear():
        _clear(h, w, *(sp_inputs[:1] if sp_inputs else ()))

    # (label, fn, extra row fields, KERNEL_CONFIG overrides) of the floor and fused variants
    timed_here = [("floor (4 GEMMs)", floor, {}, {})]
    for kind in args.kinds:
        extra = dict(kind=kind, beta=KINDS[kind])
        timed_here.append((f"fused {kind}", fused(kind), extra, {}))
        if tp > 1:
            timed_here.append((f"fused {kind} sequence-parallel", fused_sp(kind), extra, {}))
        if args.sweep and tp == 1:
            for c, ct, kernel in SWEEP.get(name, []):
                if c is not None and c > case["T"]:
                    continue
                kw = dict(chunk_tokens=c, teacher_chunk_tokens=ct)
                label = f"fused {kind} C={c or 'auto'} C_t={ct or 'auto'}" + "".join(
                    f" {k}={v}" for k, v in kernel.items()
                )
                timed_here.append((label, fused(kind, **kw), dict(extra, **kw, kernel=kernel), kernel))
        for setting in args.cluster_builds if tp == 1 else ():
            kernel = dict(_CLUSTER, cluster_build=setting)
            label = f"fused {kind} cluster_build={setting}"
            timed_here.append((label, fused(kind), dict(extra, kernel=kernel), kernel))
        for overrides in args.variant:
            label = f"fused {kind} " + " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
            timed_here.append((label, fused(kind), dict(extra, kernel=overrides), overrides))
    if args.breakdown and tp == 1:
        # where each method's time goes: GEMMs, Triton kernels, other kernels, GPU idle
        res["breakdown"] = {}
        for label, fn, _, kernel in timed_here:
            with kernel_config(kernel):
                fn()
                res["breakdown"][label] = gpu_profile.record(fn)
            log(f"  breakdown {label}: " + gpu_profile.format_summary(res["breakdown"][label]).replace("\n", " | "))
    if args.interleave:
        res["rows"] += measure_interleaved(timed_here, args.interleave, w_, group, clear, args.batch, args.host_ahead)
    else:
        for label, fn, extra, kernel in timed_here:
            with kernel_config(kernel):
                res["rows"].append(measure(label, fn, r, w_, group, extra, clear))
    for kind in args.kinds:
        if not args.no_reference:
            extra = dict(kind=kind, beta=KINDS[kind])
            row = measure(f"reference {kind}", reference(kind), max(r // 2, 3), 1, group, extra, clear)
            res["rows"].append(row)
            try:
                res["checks"][kind] = check_against_reference(h, w, ht, wt, kind, group)
            except torch.OutOfMemoryError:
                res["checks"][kind] = "OOM"
            log(f"  check vs reference {kind}: {res['checks'][kind]}")
    if tp == 1 and not args.no_liger:
        fn, why = liger_fn(h, w, ht, wt)
        if fn is None:
            res["rows"].append(dict(method="liger jsd", error=why))
            log(f"  liger: {why}")
        else:
            liger_row = measure("liger jsd", fn, max(r // 2, 3), 1, group, dict(kind="jsd", beta=0.5), clear)
            res["rows"].append(liger_row)
    if tp > 1:
        # TP=1 on this GPU alone (full vocabulary), for the per-GPU speed-up
        del h, w, ht, wt
        torch.cuda.empty_cache()
        h1, w1, ht1, wt1 = make_inputs(case, 0, v)
        _, _, fused1, _ = make_methods(h1, w1, ht1, wt1, None)
        for kind in args.kinds:
            row = measure(
                f"fused {kind} TP=1 (one GPU)", fused1(kind), r, w_, None, dict(kind=kind), lambda: _clear(h1, w1)
            )
            res["rows"].append(row)
        del h1, w1, ht1, wt1
    torch.cuda.empty_cache()
    return res


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(tp: int) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(
        device=torch.cuda.get_device_name(0),
        device_memory_gib=round(props.total_memory / GIB, 1),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        tp=tp,
        liger_kernel=_version("liger-kernel"),
        command=(f"torchrun --nproc-per-node {tp} " if tp > 1 else "python ") + " ".join(sys.argv),
        kernel_config=dict(ew.KERNEL_CONFIG),
    )


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Output layer + distillation loss, fwd+bwd ({env['device']}, {env['date'][:10]})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"liger-kernel {env.get('liger_kernel')}; TP={env['tp']}; "
        f"command: `{env['command']}`",
        "",
    ]
    for res in report["cases"]:
        floor = next((r.get("ms_median") for r in res["rows"] if r["method"].startswith("floor")), None)
        lines += [
            f"## {res['case']}: T={res['T']}, h_s={res['h_s']}, h_t={res['h_t']}, V={res['V']} "
            f"(V_local={res['v_local']}, auto chunk C={res['auto_chunk'][0]}, C_t={res['auto_chunk'][1]})",
            "",
            "| method | median ms | x floor | x floor, per round: median [q1, q3] | peak extra GiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in res["rows"]:
            ms = r.get("ms_median")
            ratio = f"{ms / floor:.3f}" if ms and floor else "-"
            paired = r.get("x_floor_paired")
            paired = f"{paired[0]:.3f} [{paired[1]:.3f}, {paired[2]:.3f}]" if paired else "-"
            cells = [r["method"], ms if ms else r.get("error"), ratio, paired, r.get("peak_extra_gib", "-")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if res.get("breakdown"):
            lines += [
                "",
                "Kernel time of one profiled call (torch.profiler; busy = time any kernel ran, idle = wall - busy):",
                "",
                "| method | wall ms | busy ms | idle | matmul ms | triton ms | other kernels ms | kernels |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for label, b in res["breakdown"].items():
                kinds = b["by_kind"]
                mm = kinds.get("matmul", {}).get("ms", 0.0)
                tr = kinds.get("triton", {}).get("ms", 0.0)
                other = sum(v["ms"] for k, v in kinds.items() if k not in ("matmul", "triton"))
                cells = [label, f"{b['wall_ms']:.2f}", f"{b['gpu_busy_ms']:.2f}", f"{b['idle_fraction']:.1%}",
                         f"{mm:.2f}", f"{tr:.2f}", f"{other:.2f}", b["kernel_count"]]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        for kind, c in res["checks"].items():
            if isinstance(c, dict):
                lines.append(
                    f"\nfused vs reference, {kind}: loss rel err {c['loss_rel_err']:.2e}, "
                    f"grad_h {c['grad_h_rel_err']:.2e}, grad_W {c['grad_w_rel_err']:.2e}"
                )
        lines.append("")
    for key in ("sp_kernel_sweep", "kernel_sweep", "gemm_sweep"):
        if report.get(key):
            lines += [f"## {key}", "", "```", *[json.dumps(r) for r in report[key]], "```", ""]
    return "\n".join(lines)


def _parse_overrides(text: str, flag: str) -> dict:
    """``KEY=JSON[,KEY=JSON]`` (ew.KERNEL_CONFIG keys) as a dict; exits naming ``flag`` on a bad item."""
    out = {}
    for item in filter(None, re.split(r",(?=\w+=)", text)):  # a comma inside a JSON string stays
        key, sep, value = item.partition("=")
        if not sep or key not in ew.KERNEL_CONFIG:
            keys = ", ".join(ew.KERNEL_CONFIG)
            raise SystemExit(f"{flag}: {item!r} is not KEY=JSON with a KERNEL_CONFIG key ({keys})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{flag}: {item!r}: the value is not JSON ({exc})") from None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES),
                   help="benchmark cases (none: only the sweeps asked for)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also time fixed chunking configurations")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="time the floor and fused variants in ROUNDS interleaved rounds instead of one after another")
    p.add_argument("--batch", type=int, default=1, metavar="CALLS",
                   help="with --interleave: each turn calls a method CALLS times back to back and counts the "
                        "mean of calls 2..CALLS (the first carries the previous method's power state)")
    p.add_argument("--host-ahead", action="store_true",
                   help="with --batch: no host synchronization between a turn's calls (the host enqueues "
                        "while the GPU works, as in training); otherwise each call starts on an idle GPU")
    p.add_argument("--cluster-builds", nargs="+", default=[], metavar="BUILD",
                   help="also time the automatic chunking with the cluster kernel in these builds (TP=1; "
                        "cluster_single_pass.parse_build names, or kl:<name>,jsd:<name>)")
    p.add_argument("--breakdown", action="store_true",
                   help="profile one call of each timed method: GEMM / Triton / other kernel time and GPU idle")
    p.add_argument("--kernel-sweep", action="store_true", help="single-pass kernel configurations vs multi-pass")
    p.add_argument("--gemm-sweep", action="store_true", help="GEMM speed at chunk sizes")
    p.add_argument("--gemm-rows", nargs="+", type=int, default=list(GEMM_ROWS), metavar="M",
                   help="chunk sizes of --gemm-sweep")
    p.add_argument("--gemm-blas", nargs="+", default=[None], choices=["cublas", "cublaslt"],
                   help="BLAS libraries of --gemm-sweep (default: as configured)")
    p.add_argument("--profile-kernels", action="store_true", help="only launch the element-wise kernels (for ncu)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the output files' names")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override ew.KERNEL_CONFIG entries")
    p.add_argument("--variant", nargs="+", default=[], metavar="KEY=JSON[,KEY=JSON]",
                   help="also time the fused loss with these ew.KERNEL_CONFIG overrides, one row per variant "
                        "(e.g. 'sp_variant=\"reread\"' or 'single_pass=false')")
    args = p.parse_args()
    args.variant = [_parse_overrides(v, "--variant") for v in args.variant]
    if args.batch < 1 or (args.batch > 1 and not args.interleave):
        p.error(f"--batch {args.batch}: needs --interleave and at least 1 call (2 or more to batch)")
    if args.host_ahead and args.batch < 2:
        p.error("--host-ahead needs --batch 2 or more")

    ew.KERNEL_CONFIG.update(_parse_overrides(",".join(args.set), "--set") if args.set else {})
    if args.profile_kernels:
        profile_kernels(CASES["T8k_V152k"]["V"], 1024)
        return
    group, rank = None, 0
    if args.tp > 1:
        dist.init_process_group("nccl")
        rank = dist.get_rank()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        group = dist.group.WORLD
        assert dist.get_world_size() == args.tp, "run with torchrun --nproc-per-node <tp>"
    env = environment(args.tp)
    report = dict(environment=env, cases=[])
    slug = env["device"].replace("NVIDIA ", "").replace(" ", "-")
    stem = f"loss_kernel_{slug}_{env['date'][:10]}" + (f"_tp{args.tp}" if args.tp > 1 else "")
    stem += f"_{args.tag}" if args.tag else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        if rank == 0:
            (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
            (out / f"{stem}.md").write_text(markdown(report))

    t0 = time.time()
    if args.kernel_sweep and rank == 0:
        v1 = CASES["T8k_V152k"]["V"] // args.tp
        report["sp_kernel_sweep"] = sp_kernel_sweep(v1, 1024) + sp_kernel_sweep(v1, 512)
        save()
    for name in args.cases:
        report["cases"].append(run_case(name, CASES[name], args, group, args.tp, rank))
        save()
    if args.gemm_sweep and rank == 0:
        report["gemm_sweep"] = gemm_sweep(CASES["T8k_V152k"], args.gemm_rows, args.gemm_blas)
        save()
    log(f"done in {time.time() - t0:.0f} s; wrote {out / stem}.json/.md")
    if rank == 0:
        print(markdown(report))
    if args.tp > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
