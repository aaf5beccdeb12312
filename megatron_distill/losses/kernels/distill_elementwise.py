"""Element-wise part of the fused output-layer + distillation loss: per-row softmax statistics,
loss terms and d loss / d student-logits, for one token chunk of vocab-parallel logits.

Everything here works on two ``[rows, V_local]`` logits buffers (student ``zs``, teacher ``zt``,
bf16 or fp32, rows contiguous) and computes in fp32. The matrix products around it live in
``losses/fused.py``; so do the tensor-parallel all-reduces, which is why the work is split into
passes that each read the chunk once:

* ``row_stats``: online max / sum-exp of both tempered rows (and, for reverse KL, the
  p_S-weighted sum of (s - t), which gives the per-token reverse KL once the normalisers are
  known). Exponentials are base 2 so each element costs one ``exp2``.
* ``kl_loss_grad_``: forward / reverse KL loss terms, and dz written in place over ``zs``.
* ``jsd_row_sums`` then ``jsd_grad_``: JSD's gradient needs KL(p_S || M) of the whole row
  (all TP shards) before any element of dz can be written, hence a third pass.

Every kernel runs on a 2-D grid (row, vocab segment): with one program per row, a chunk of a
few hundred rows leaves the last wave of programs mostly idle (measured: 2.6 instead of
3 TB/s, and 0.3 ms lost per 512-row chunk). Each segment therefore writes partial results, which
the next pass combines in its prologue:

* statistics ``[5, S, rows]`` (fp32): ``m_s, m_t`` (maxima of the raw logits z), ``l_s, l_t``
  (sums of 2^((z - m) c), c = log2(e) / tau), ``a`` (sum of 2^((z_s - m_s) c) (z_s - z_t) c).
  Maxima stay in logit units because z - m is exact for bf16 logits: log-probabilities
  (z - m) c - log2(l) then carry no rounding of a large z c, which matters for JSD's gradient,
  a difference of nearly equal log-probabilities. ``combine_stats`` folds S partials into one
  (as the tensor-parallel all-reduce needs them);
* row sums (loss terms, KL(p_S || M)) ``[S, rows]``: plain sums.

With one process (no TP) ``single_pass_loss_grad_`` does all of it in one persistent launch:
the programs sharing a row (one vocab segment each) publish partial statistics, meet on a
per-row counter in global memory (release / acquire atomics), then re-read their segment,
mostly from L2, to write the loss terms and dz; JSD meets twice. The grid must be resident as
a whole (a program waits for its peers), so it is sized from the compiled kernel's registers
and shared memory, and the interpreter (one program at a time) runs it with one segment per
row. ``_pipelined_kernel`` is a variant that reads the next row while finishing this one.

Each entry point has a plain PyTorch twin (``impl="torch"``, one partial, S = 1) computing the
same quantities, used where Triton cannot run and as the kernels' reference in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch

from megatron_distill.losses.kernels import cluster_single_pass as cluster

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch-only installs use impl="torch"
    triton = None
    tl = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
N_STATS = 5


def _env_flag(name: str, default: bool) -> bool:
    """True / False for an environment variable set to 1 / 0, ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"${name} must be 0 or 1, got {value!r}")
    return default if value == "" else value == "1"


# Launch configuration on CUDA (benchmarks/loss_kernel.py --kernel-sweep measures the options):
# a slice of 4096 bf16 elements is two 16-byte loads per tensor per thread with 8 warps;
# num_stages > 1 lets Triton prefetch the next slices (cp.async) while this one is computed;
# the grid gets about programs_per_sm programs per multiprocessor.
KERNEL_CONFIG = dict(
    block_v=4096,
    num_warps=8,
    num_stages=3,
    programs_per_sm=16,
    # single-launch path (TP = 1, single_pass_loss_grad_): a persistent grid of at most
    # sp_programs_per_sm resident programs per multiprocessor, about sp_segments per row.
    # None = the per-kind default of SP_DEFAULTS; a value overrides it for every kind.
    # single_pass: the default path at TP = 1 (1-1.5% of the fused step faster than the
    # multi-pass kernels, NOTES_loss_kernel.md iteration 12); $MEGATRON_DISTILL_SINGLE_PASS=0
    # turns it off.
    single_pass=_env_flag("MEGATRON_DISTILL_SINGLE_PASS", default=True),
    # cluster_kernel: whether the single pass's "cluster" variant may run cluster_single_pass.cu
    # (else it means "reread"); $MEGATRON_DISTILL_CLUSTER_KERNEL=0 turns it off.
    cluster_kernel=_env_flag("MEGATRON_DISTILL_CLUSTER_KERNEL", default=True),
    # cluster_build: the cluster kernel's build (cluster_single_pass.parse_build), one name for
    # every kind ("c16t256m2or") or per kind group ("kl:c8t256,jsd:c16t256m2or"); None = the
    # CLUSTER_BUILDS defaults; $MEGATRON_DISTILL_CLUSTER_BUILD sets it
    cluster_build=os.environ.get("MEGATRON_DISTILL_CLUSTER_BUILD") or None,
    # sp_variant: one of SP_VARIANTS for every kind ($MEGATRON_DISTILL_SP_VARIANT), None = SP_DEFAULTS
    sp_variant=os.environ.get("MEGATRON_DISTILL_SP_VARIANT") or None,
    sp_block_v=None,
    sp_num_warps=None,
    sp_num_stages=None,
    sp_programs_per_sm=None,
    sp_segments=None,
    # polls of a row's counter before a "reread" program stops waiting for its peers and marks
    # the row for the repair launch (a poll is one L2 atomic, well under a microsecond)
    sp_max_polls=1 << 17,
)
# Measured on an H100 (benchmarks/NOTES_loss_kernel.md, iterations 4-5; 1024 x 151936 bf16
# chunk, 10 back-to-back launches): KL 0.434 ms with these settings (multi-pass 0.539), JSD
# 0.652 ms (multi-pass 0.801); the pipelined kernel was slower for both (0.485 / 0.724 at best:
# its second read of a segment misses L2 about twice as often).
# Since iteration 17 the default variant is "cluster" (0.88x / 0.90x the time of "reread" per
# 512 x 151936 chunk, same runs); the Triton settings below serve its fallback ("reread") and the
# explicit "reread" / "pipelined" variants.
SP_DEFAULTS = {
    "kl": dict(variant="cluster", block_v=2048, num_warps=4, num_stages=3, programs_per_sm=4, segments=16),
    "jsd": dict(variant="cluster", block_v=1024, num_warps=4, num_stages=3, programs_per_sm=8, segments=16),
}
# single_pass_loss_grad_'s kernels: "cluster" (cluster_single_pass.cu, bf16 on sm_90+; elsewhere
# it falls back to "reread") holds a row in the shared memory of a thread-block cluster,
# "reread" reads each segment twice (the second time mostly from L2), "pipelined" reads the next
# row while finishing this one. The block_v / num_warps / ... settings are the Triton kernels'. (A third, holding each
# program's segment in registers with no re-read, was 1.5-1.8x slower than "reread": per row a
# program waits ~5 us on its peers with too few bytes in flight; NOTES_loss_kernel.md, iteration 6.)
SP_VARIANTS = ("cluster", "reread", "pipelined")
# one row stage per block, so three blocks (of different clusters) share a multiprocessor and fill
# each other's barrier gaps: the fastest of 21 builds on an H100 (NOTES_loss_kernel.md, iteration 17);
# JSD keeps its log-ratio in fp16 for the dz pass (h: 13-15% faster per chunk, iteration 18) and
# p_S with it (q: 4-5%); at the cluster meetings only the partials' writer fences (a: 2%; iteration 19);
# the KL kinds' dz pass starts the next row's copy (b, with 128 threads: 5-7% against c8t256s1m2a;
# JSD gained nothing measurable from it, iteration 20); no block barrier around a row's copy (n) and
# maxima on bf16 pairs with fma exponents (f: JSD 4%, KL 1%; iteration 21); JSD's log-probabilities
# as one fma each (e: JSD 1.5%, KL 1% slower; iteration 22)
CLUSTER_BUILDS = {"kl": "c8t128s1m2abnf", "jsd": "c8t128s1m2hqanfe"}
_INTERPRET_BLOCK_V = 1024  # the interpreter runs one numpy op per statement: wide is faster
_GROUP = 8  # running maxima per 8 consecutive elements: one 16-byte bf16 vector per thread


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA, or the CPU interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    _LN2 = tl.constexpr(LN2)  # kernels may only read globals that are constexpr

    @triton.jit
    def _log2(x, FAST: tl.constexpr):
        # tl.log2 is a ~20-instruction precise routine; the hardware approximation (abs error
        # ~2^-22) is as good as fp32 rounding of the result and keeps JSD memory-bound
        if FAST:
            return tl.inline_asm_elementwise(
                "lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            return tl.log2(x)

    @triton.jit
    def _segment(n_cols, seg_len):
        col0 = tl.program_id(1) * seg_len
        return col0, tl.minimum(col0 + seg_len, n_cols)

    @triton.jit
    def _group_stats(z_row, col0, col1, scale2, BLOCK_V: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr):
        # One running max per GROUP consecutive elements (held by one thread): no cross-thread
        # reduction inside the loop, one extra exp2 per GROUP elements.
        offs = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        m = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            z = tl.load(z_row + cols, mask=cols < col1, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # groups not reached yet
            acc = acc * tl.exp2((m - m_use) * scale2) + tl.sum(tl.exp2((z - m_use[:, None]) * scale2), axis=1)
            m = m_new
        m_row = tl.max(m, axis=0)
        m_row_use = tl.where(m_row == float("-inf"), 0.0, m_row)
        return m_row, tl.sum(acc * tl.exp2((m - m_row_use) * scale2), axis=0)

    @triton.jit
    def _cross_stats(
        zs_row, zt_row, col0, col1, scale2, BLOCK_V: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr
    ):
        # Student statistics plus a = sum 2^((z_s - m_s) c) (z_s - z_t) c, rescaled with m_s.
        offs = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        m = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        cross = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            zs = tl.load(zs_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, tl.max(zs, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m - m_use) * scale2)
            e = tl.exp2((zs - m_use[:, None]) * scale2)
            acc = acc * alpha + tl.sum(e, axis=1)
            # masked lanes: e = 0 but zs = -inf; keep the product finite
            cross = cross * alpha + tl.sum(e * (tl.where(mask, zs, 0.0) - zt), axis=1) * scale2
            m = m_new
        m_row = tl.max(m, axis=0)
        scale = tl.exp2((m - tl.where(m_row == float("-inf"), 0.0, m_row)) * scale2)
        return m_row, tl.sum(acc * scale, axis=0), tl.sum(cross * scale, axis=0)

    @triton.jit
    def _row_stats_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, n_rows, n_cols, seg_len, scale2,
        WANT_CROSS: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
    ):
        row = tl.program_id(0)
        part = tl.program_id(1) * n_rows + row
        plane = tl.num_programs(1) * n_rows
        col0, col1 = _segment(n_cols, seg_len)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        if WANT_CROSS:
            m_s, l_s, a = _cross_stats(zs_row, zt_row, col0, col1, scale2, BLOCK_V, GROUP, STAGES)
        else:
            m_s, l_s = _group_stats(zs_row, col0, col1, scale2, BLOCK_V, GROUP, STAGES)
            a = 0.0
        m_t, l_t = _group_stats(zt_row, col0, col1, scale2, BLOCK_V, GROUP, STAGES)
        tl.store(stats_ptr + part, m_s)
        tl.store(stats_ptr + plane + part, m_t)
        tl.store(stats_ptr + 2 * plane + part, l_s)
        tl.store(stats_ptr + 3 * plane + part, l_t)
        tl.store(stats_ptr + 4 * plane + part, a)

    @triton.jit
    def _load_parts(p, valid, other, L2_ONLY: tl.constexpr):
        # L2_ONLY: values another program of this launch just wrote; L1 is not coherent
        if L2_ONLY:
            return tl.load(p, mask=valid, other=other, cache_modifier=".cg")
        else:
            return tl.load(p, mask=valid, other=other)

    @triton.jit
    def _combined_stats(stats_ptr, row, n_rows, n_parts, scale2, PARTS: tl.constexpr, L2_ONLY: tl.constexpr = False):
        # Fold the segments' partial statistics of one row: max, then rescaled sums.
        # Returns m_s, m_t and log2 of the row's sum-exps, and a / l_s (reverse KL term).
        idx = tl.arange(0, PARTS)
        valid = idx < n_parts
        plane = n_parts * n_rows
        p = stats_ptr + idx * n_rows + row
        ms = _load_parts(p, valid, float("-inf"), L2_ONLY)
        mt = _load_parts(p + plane, valid, float("-inf"), L2_ONLY)
        m_s = tl.max(ms, axis=0)
        m_t = tl.max(mt, axis=0)
        ws = tl.where(valid, tl.exp2((ms - m_s) * scale2), 0.0)
        wt = tl.where(valid, tl.exp2((mt - m_t) * scale2), 0.0)
        l_s = tl.sum(ws * _load_parts(p + 2 * plane, valid, 0.0, L2_ONLY), axis=0)
        l_t = tl.sum(wt * _load_parts(p + 3 * plane, valid, 0.0, L2_ONLY), axis=0)
        a = tl.sum(ws * _load_parts(p + 4 * plane, valid, 0.0, L2_ONLY), axis=0)
        return m_s, m_t, tl.log2(l_s), tl.log2(l_t), a / l_s

    @triton.jit
    def _row_reverse_kl(a_over_l, m_s, m_t, lg_s, lg_t, scale2):
        # Reverse KL of a whole row (all shards) from its combined statistics (_combined_stats):
        # E_pS[s - t] - (lse_s - lse_t), natural log.
        return (a_over_l - ((m_s - m_t) * scale2 + lg_s - lg_t)) * _LN2

    @triton.jit
    def _kl_segment(
        zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, rkl, scale2, grad_scale,
        REVERSE: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    ):
        # Loss terms of one segment (returned, natural log) and dz written over the student row.
        offs = tl.arange(0, BLOCK_V)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            ls = (tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            ps = tl.exp2(ls)
            if REVERSE:
                dz = ps * ((ls - lt) * _LN2 - rkl)
                term = ps * (ls - lt)
            else:
                pt = tl.exp2(lt)
                dz = ps - pt
                term = pt * (lt - ls)
            tl.store(zs_row + cols, (dz * grad_scale).to(zs_row.dtype.element_ty), mask=mask)
            acc += tl.where(mask, term, 0.0)
        return tl.sum(acc, axis=0) * _LN2

    @triton.jit
    def _kl_loss_grad_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, n_parts, loss_ptr, loss_stride,
        n_rows, n_cols, seg_len, scale2, grad_scale,
        REVERSE: tl.constexpr, PARTS: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    ):
        row = tl.program_id(0)
        col0, col1 = _segment(n_cols, seg_len)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        m_s, m_t, lg_s, lg_t, a_over_l = _combined_stats(stats_ptr, row, n_rows, n_parts, scale2, PARTS)
        # dz needs the row's reverse KL before the row is revisited: the only row-global term
        rkl = _row_reverse_kl(a_over_l, m_s, m_t, lg_s, lg_t, scale2)
        loss = _kl_segment(
            zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, rkl, scale2, grad_scale, REVERSE, BLOCK_V, STAGES
        )
        tl.store(loss_ptr + tl.program_id(1) * loss_stride + row, loss)

    @triton.jit
    def _jsd_sums_segment(
        zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, scale2, beta,
        BLOCK_V: tl.constexpr, FAST_LOG: tl.constexpr, STAGES: tl.constexpr,
    ):
        # KL(p_S || M) and KL(p_T || M) over one segment (natural log).
        offs = tl.arange(0, BLOCK_V)
        acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            ls = (tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            ps = tl.exp2(ls)
            pt = tl.exp2(lt)
            mix = beta * pt + (1.0 - beta) * ps
            # both probabilities underflowed: the element contributes nothing, and log2(0) must
            # not turn 0 * -inf into nan
            valid = mask & (mix > 0.0)
            lm = _log2(tl.where(valid, mix, 1.0), FAST_LOG)
            acc_s += tl.where(valid, ps * (ls - lm), 0.0)
            acc_t += tl.where(valid, pt * (lt - lm), 0.0)
        return tl.sum(acc_s, axis=0) * _LN2, tl.sum(acc_t, axis=0) * _LN2

    @triton.jit
    def _jsd_grad_segment(
        zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, kl_s, scale2, beta, scale,
        BLOCK_V: tl.constexpr, FAST_LOG: tl.constexpr, STAGES: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK_V)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            ls = (tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            ps = tl.exp2(ls)
            mix = beta * tl.exp2(lt) + (1.0 - beta) * ps
            valid = mix > 0.0
            lm = _log2(tl.where(valid, mix, 1.0), FAST_LOG)
            dz = tl.where(valid, ps * ((ls - lm) * _LN2 - kl_s), 0.0)
            tl.store(zs_row + cols, (dz * scale).to(zs_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _jsd_row_sums_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, n_parts, kl_ptr, loss_ptr, loss_stride,
        n_rows, n_cols, seg_len, scale2, beta,
        PARTS: tl.constexpr, BLOCK_V: tl.constexpr, FAST_LOG: tl.constexpr, STAGES: tl.constexpr,
    ):
        row = tl.program_id(0)
        col0, col1 = _segment(n_cols, seg_len)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        m_s, m_t, lg_s, lg_t, _ = _combined_stats(stats_ptr, row, n_rows, n_parts, scale2, PARTS)
        kl_s, kl_t = _jsd_sums_segment(
            zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, scale2, beta, BLOCK_V, FAST_LOG, STAGES
        )
        tl.store(kl_ptr + tl.program_id(1) * n_rows + row, kl_s)
        tl.store(loss_ptr + tl.program_id(1) * loss_stride + row, beta * kl_t + (1.0 - beta) * kl_s)

    @triton.jit
    def _jsd_grad_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, n_parts, kl_ptr, n_kl_parts,
        n_rows, n_cols, seg_len, scale2, beta, grad_scale,
        PARTS: tl.constexpr, KL_PARTS: tl.constexpr, BLOCK_V: tl.constexpr, FAST_LOG: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        row = tl.program_id(0)
        col0, col1 = _segment(n_cols, seg_len)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        m_s, m_t, lg_s, lg_t, _ = _combined_stats(stats_ptr, row, n_rows, n_parts, scale2, PARTS)
        kidx = tl.arange(0, KL_PARTS)
        kl_s = tl.sum(tl.load(kl_ptr + kidx * n_rows + row, mask=kidx < n_kl_parts, other=0.0), axis=0)
        _jsd_grad_segment(
            zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, kl_s, scale2, beta, (1.0 - beta) * grad_scale,
            BLOCK_V, FAST_LOG, STAGES,
        )

    # -----------------------------------------------------------------------------------------
    # Single-launch path for one process (TP = 1): statistics, loss and dz of a chunk in one
    # persistent kernel. S programs share a row (one vocab segment each), publish their partial
    # statistics, wait for each other on a per-row counter, then re-read their segment (from L2:
    # it was read microseconds before) to write dz. DRAM traffic: read z_S and z_T once, write
    # dz once (3 units instead of 5 for KL, 7 for JSD).
    # -----------------------------------------------------------------------------------------

    @triton.jit
    def _stats_step(zs, zt, mask, ms, mt, acc_s, acc_t, cross, scale2, WANT_CROSS: tl.constexpr):
        # One [BLOCK_V / GROUP, GROUP] slice of both rows' grouped online statistics (masked
        # lanes hold -inf).
        ms_new = tl.maximum(ms, tl.max(zs, axis=1))
        mt_new = tl.maximum(mt, tl.max(zt, axis=1))
        ms_use = tl.where(ms_new == float("-inf"), 0.0, ms_new)  # groups not reached yet
        mt_use = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        alpha_s = tl.exp2((ms - ms_use) * scale2)
        es = tl.exp2((zs - ms_use[:, None]) * scale2)
        acc_s = acc_s * alpha_s + tl.sum(es, axis=1)
        acc_t = acc_t * tl.exp2((mt - mt_use) * scale2) + tl.sum(tl.exp2((zt - mt_use[:, None]) * scale2), axis=1)
        if WANT_CROSS:
            # masked lanes: es = 0 but z = -inf; keep the product finite
            diff = tl.where(mask, zs, 0.0) - tl.where(mask, zt, 0.0)
            cross = cross * alpha_s + tl.sum(es * diff, axis=1) * scale2
        return ms_new, mt_new, acc_s, acc_t, cross

    @triton.jit
    def _stats_done(ms, mt, acc_s, acc_t, cross, scale2):
        ms_row = tl.max(ms, axis=0)
        mt_row = tl.max(mt, axis=0)
        w_s = tl.exp2((ms - tl.where(ms_row == float("-inf"), 0.0, ms_row)) * scale2)
        w_t = tl.exp2((mt - tl.where(mt_row == float("-inf"), 0.0, mt_row)) * scale2)
        return (
            ms_row, tl.sum(acc_s * w_s, axis=0), mt_row, tl.sum(acc_t * w_t, axis=0), tl.sum(cross * w_s, axis=0)
        )

    @triton.jit
    def _pair_stats(
        zs_row, zt_row, col0, col1, scale2,
        WANT_CROSS: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
    ):
        # _group_stats of both rows (and _cross_stats' a) in one loop: both loads in flight.
        offs = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ms = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        mt = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        cross = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            zs = tl.load(zs_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            zt = tl.load(zt_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            ms, mt, acc_s, acc_t, cross = _stats_step(zs, zt, mask, ms, mt, acc_s, acc_t, cross, scale2, WANT_CROSS)
        return _stats_done(ms, mt, acc_s, acc_t, cross, scale2)

    @triton.jit
    def _publish(part, plane, m_s, m_t, l_s, l_t, a):
        tl.store(part, m_s)
        tl.store(part + plane, m_t)
        tl.store(part + 2 * plane, l_s)
        tl.store(part + 3 * plane, l_t)
        tl.store(part + 4 * plane, a)

    @triton.jit
    def _arrive(counter):
        # every thread's stores of this program happen before the release
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="release", scope="gpu")

    @triton.jit
    def _wait(counter, n_parts):
        # acquire: the peers' stores are visible after this (read them with L2-only loads)
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < n_parts:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _meet(counter, n_parts, max_polls, POISON: tl.constexpr):
        # _wait for at most max_polls polls. True when every peer arrived. Otherwise the row's
        # counter is set to POISON (by this program, or by a peer that gave up first): no
        # program of the row ever passes this meeting, none writes the row's dz, and
        # _repair_kernel redoes the row after the launch. So a launch never hangs on peers that
        # are not resident (kernels of other streams holding multiprocessors).
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        polls = 0
        while (seen >= 0) & (seen < n_parts):
            if polls < max_polls:
                seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
            else:
                # poison only if nobody arrived since the last poll; else look again
                prev = tl.atomic_cas(counter, seen, POISON, sem="acq_rel", scope="gpu")
                seen = tl.where(prev == seen, POISON, prev)
            polls += 1
        tl.debug_barrier()
        return seen >= n_parts

    @triton.jit
    def _kl_next_stats(
        zs_cur, zt_cur, zs_nxt, zt_nxt, col1_n, col0, col1, m_s, m_t, lg_s, lg_t, rkl, scale2, grad_scale,
        REVERSE: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
    ):
        # One loop over the segment: dz and loss terms of the current row (re-read, from L2)
        # and the statistics of the next row (first read, from DRAM), so that DRAM loads stay
        # in flight while the current row is finished.
        offs = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ms = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        mt = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        cross = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        acc = tl.zeros([BLOCK_V // GROUP, GROUP], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            mask_n = cols < col1_n
            ls = (tl.load(zs_cur + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_cur + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            zs = tl.load(zs_nxt + cols, mask=mask_n, other=float("-inf")).to(tl.float32)
            zt = tl.load(zt_nxt + cols, mask=mask_n, other=float("-inf")).to(tl.float32)
            ps = tl.exp2(ls)
            if REVERSE:
                dz = ps * ((ls - lt) * _LN2 - rkl)
                term = ps * (ls - lt)
            else:
                pt = tl.exp2(lt)
                dz = ps - pt
                term = pt * (lt - ls)
            tl.store(zs_cur + cols, (dz * grad_scale).to(zs_cur.dtype.element_ty), mask=mask)
            acc += tl.where(mask, term, 0.0)
            ms, mt, acc_s, acc_t, cross = _stats_step(zs, zt, mask_n, ms, mt, acc_s, acc_t, cross, scale2, REVERSE)
        n_ms, n_ls, n_mt, n_lt, n_a = _stats_done(ms, mt, acc_s, acc_t, cross, scale2)
        return tl.sum(tl.sum(acc, axis=1), axis=0) * _LN2, n_ms, n_ls, n_mt, n_lt, n_a

    @triton.jit
    def _jsd_next_stats(
        zs_cur, zt_cur, zs_nxt, zt_nxt, col1_n, col0, col1, m_s, m_t, lg_s, lg_t, scale2, beta,
        BLOCK_V: tl.constexpr, GROUP: tl.constexpr, FAST_LOG: tl.constexpr, STAGES: tl.constexpr,
    ):
        # _jsd_sums_segment of the current row (L2) and the next row's statistics (DRAM).
        offs = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ms = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        mt = tl.full([BLOCK_V // GROUP], float("-inf"), dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        cross = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
        kl_s = tl.zeros([BLOCK_V // GROUP, GROUP], dtype=tl.float32)
        kl_t = tl.zeros([BLOCK_V // GROUP, GROUP], dtype=tl.float32)
        for start in tl.range(col0, col1, BLOCK_V, num_stages=STAGES):
            cols = start + offs
            mask = cols < col1
            mask_n = cols < col1_n
            ls = (tl.load(zs_cur + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_cur + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            zs = tl.load(zs_nxt + cols, mask=mask_n, other=float("-inf")).to(tl.float32)
            zt = tl.load(zt_nxt + cols, mask=mask_n, other=float("-inf")).to(tl.float32)
            ps = tl.exp2(ls)
            pt = tl.exp2(lt)
            mix = beta * pt + (1.0 - beta) * ps
            valid = mask & (mix > 0.0)
            lm = _log2(tl.where(valid, mix, 1.0), FAST_LOG)
            kl_s += tl.where(valid, ps * (ls - lm), 0.0)
            kl_t += tl.where(valid, pt * (lt - lm), 0.0)
            ms, mt, acc_s, acc_t, cross = _stats_step(zs, zt, mask_n, ms, mt, acc_s, acc_t, cross, scale2, False)
        n_ms, n_ls, n_mt, n_lt, n_a = _stats_done(ms, mt, acc_s, acc_t, cross, scale2)
        kl_s_sum = tl.sum(tl.sum(kl_s, axis=1), axis=0) * _LN2
        kl_t_sum = tl.sum(tl.sum(kl_t, axis=1), axis=0) * _LN2
        return kl_s_sum, kl_t_sum, n_ms, n_ls, n_mt, n_lt, n_a

    @triton.jit
    def _pipelined_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, part_ptr, cnt_ptr, loss_ptr, loss_stride,
        n_rows, n_cols, seg_len, n_parts, scale2, beta, grad_scale,
        KIND: tl.constexpr, PARTS: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr,
        STAGES: tl.constexpr, FAST_LOG: tl.constexpr,
    ):
        # _single_pass_kernel software-pipelined over rows: while a program finishes row r
        # (whose statistics its peers published one loop earlier, so the wait is short) it
        # reads row r + step for the first time and publishes that row's partial statistics.
        pid = tl.program_id(0)
        seg = pid % n_parts
        step = tl.num_programs(0) // n_parts
        col0 = seg * seg_len
        col1 = tl.minimum(col0 + seg_len, n_cols)
        plane = n_parts * n_rows
        first = pid // n_parts
        zs_row = zs_ptr + tl.cast(first, tl.int64) * stride_s
        zt_row = zt_ptr + tl.cast(first, tl.int64) * stride_t
        m_s, l_s, m_t, l_t, a = _pair_stats(zs_row, zt_row, col0, col1, scale2, KIND == 1, BLOCK_V, GROUP, STAGES)
        _publish(part_ptr + seg * n_rows + first, plane, m_s, m_t, l_s, l_t, a)
        _arrive(cnt_ptr + first)
        for row in range(first, n_rows, step):
            nxt = row + step
            has_next = nxt < n_rows
            col1_n = tl.where(has_next, col1, col0)  # no next row: nothing to read
            zs_row = zs_ptr + tl.cast(row, tl.int64) * stride_s
            zt_row = zt_ptr + tl.cast(row, tl.int64) * stride_t
            # the next row's pointers (masked off past the last row)
            zs_nxt = zs_ptr + tl.cast(tl.minimum(nxt, n_rows - 1), tl.int64) * stride_s
            zt_nxt = zt_ptr + tl.cast(tl.minimum(nxt, n_rows - 1), tl.int64) * stride_t
            _wait(cnt_ptr + row, n_parts)
            m_s, m_t, lg_s, lg_t, a_over_l = _combined_stats(part_ptr, row, n_rows, n_parts, scale2, PARTS, True)
            if KIND < 2:
                rkl = _row_reverse_kl(a_over_l, m_s, m_t, lg_s, lg_t, scale2)
                loss, n_ms, n_ls, n_mt, n_lt, n_a = _kl_next_stats(
                    zs_row, zt_row, zs_nxt, zt_nxt, col1_n, col0, col1, m_s, m_t, lg_s, lg_t, rkl, scale2,
                    grad_scale, KIND == 1, BLOCK_V, GROUP, STAGES,
                )
                tl.store(loss_ptr + seg * loss_stride + row, loss)
            else:
                kl_s, kl_t, n_ms, n_ls, n_mt, n_lt, n_a = _jsd_next_stats(
                    zs_row, zt_row, zs_nxt, zt_nxt, col1_n, col0, col1, m_s, m_t, lg_s, lg_t, scale2, beta,
                    BLOCK_V, GROUP, FAST_LOG, STAGES,
                )
                tl.store(loss_ptr + seg * loss_stride + row, beta * kl_t + (1.0 - beta) * kl_s)
                tl.store(part_ptr + 5 * plane + seg * n_rows + row, kl_s)
                _arrive(cnt_ptr + n_rows + row)
            if has_next:
                _publish(part_ptr + seg * n_rows + nxt, plane, n_ms, n_mt, n_ls, n_lt, n_a)
                _arrive(cnt_ptr + nxt)
            if KIND == 2:
                _wait(cnt_ptr + n_rows + row, n_parts)
                kidx = tl.arange(0, PARTS)
                kl_row = tl.sum(
                    _load_parts(part_ptr + 5 * plane + kidx * n_rows + row, kidx < n_parts, 0.0, True), axis=0
                )
                _jsd_grad_segment(
                    zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, kl_row, scale2, beta,
                    (1.0 - beta) * grad_scale, BLOCK_V, FAST_LOG, STAGES,
                )

    @triton.jit
    def _single_pass_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, part_ptr, cnt_ptr, loss_ptr, loss_stride,
        n_rows, n_cols, seg_len, n_parts, scale2, beta, grad_scale, max_polls,
        KIND: tl.constexpr, PARTS: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr,
        STAGES: tl.constexpr, FAST_LOG: tl.constexpr, POISON: tl.constexpr,
    ):
        # KIND: 0 forward KL, 1 reverse KL, 2 JSD (0 < beta < 1). Grid: a multiple of n_parts
        # programs, normally all resident; program p always works on segment p % n_parts, and
        # the n_parts programs of a row are a fixed group. part: [6, n_parts, n_rows] (5
        # statistics + JSD's KL(p_S || M)). cnt: [2, n_rows] meeting counters (JSD meets twice);
        # a row whose meeting timed out (_meet) is left untouched for _repair_kernel.
        pid = tl.program_id(0)
        seg = pid % n_parts
        rows_per_step = tl.num_programs(0) // n_parts
        col0 = seg * seg_len
        col1 = tl.minimum(col0 + seg_len, n_cols)
        plane = n_parts * n_rows
        for row in range(pid // n_parts, n_rows, rows_per_step):
            zs_row = zs_ptr + tl.cast(row, tl.int64) * stride_s
            zt_row = zt_ptr + tl.cast(row, tl.int64) * stride_t
            part = part_ptr + seg * n_rows + row
            m_s, l_s, m_t, l_t, a = _pair_stats(zs_row, zt_row, col0, col1, scale2, KIND == 1, BLOCK_V, GROUP, STAGES)
            _publish(part, plane, m_s, m_t, l_s, l_t, a)
            _arrive(cnt_ptr + row)
            if _meet(cnt_ptr + row, n_parts, max_polls, POISON):
                m_s, m_t, lg_s, lg_t, a_over_l = _combined_stats(part_ptr, row, n_rows, n_parts, scale2, PARTS, True)
                if KIND < 2:
                    rkl = _row_reverse_kl(a_over_l, m_s, m_t, lg_s, lg_t, scale2)
                    loss = _kl_segment(
                        zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, rkl, scale2, grad_scale, KIND == 1,
                        BLOCK_V, STAGES,
                    )
                    tl.store(loss_ptr + seg * loss_stride + row, loss)
                else:
                    kl_s, kl_t = _jsd_sums_segment(
                        zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, scale2, beta, BLOCK_V, FAST_LOG, STAGES
                    )
                    tl.store(loss_ptr + seg * loss_stride + row, beta * kl_t + (1.0 - beta) * kl_s)
                    tl.store(part + 5 * plane, kl_s)
                    _arrive(cnt_ptr + n_rows + row)
                    if _meet(cnt_ptr + n_rows + row, n_parts, max_polls, POISON):
                        kidx = tl.arange(0, PARTS)
                        kl_row = tl.sum(
                            _load_parts(part_ptr + 5 * plane + kidx * n_rows + row, kidx < n_parts, 0.0, True),
                            axis=0,
                        )
                        _jsd_grad_segment(
                            zs_row, zt_row, col0, col1, m_s, m_t, lg_s, lg_t, kl_row, scale2, beta,
                            (1.0 - beta) * grad_scale, BLOCK_V, FAST_LOG, STAGES,
                        )

    @triton.jit
    def _repair_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, cnt_ptr, loss_ptr, loss_stride,
        n_rows, n_cols, n_parts, scale2, beta, grad_scale,
        KIND: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
        FAST_LOG: tl.constexpr,
    ):
        # After _single_pass_kernel: each row whose meeting timed out (a negative counter; its
        # logits are untouched) done whole by one program: statistics, loss (into partial 0,
        # the other partials zeroed), dz. Rows that met cost two counter loads.
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            if (tl.load(cnt_ptr + row) < 0) | (tl.load(cnt_ptr + n_rows + row) < 0):
                zs_row = zs_ptr + tl.cast(row, tl.int64) * stride_s
                zt_row = zt_ptr + tl.cast(row, tl.int64) * stride_t
                m_s, l_s, m_t, l_t, a = _pair_stats(
                    zs_row, zt_row, 0, n_cols, scale2, KIND == 1, BLOCK_V, GROUP, STAGES
                )
                lg_s = tl.log2(l_s)
                lg_t = tl.log2(l_t)
                if KIND < 2:
                    rkl = _row_reverse_kl(a / l_s, m_s, m_t, lg_s, lg_t, scale2)
                    loss = _kl_segment(
                        zs_row, zt_row, 0, n_cols, m_s, m_t, lg_s, lg_t, rkl, scale2, grad_scale, KIND == 1,
                        BLOCK_V, STAGES,
                    )
                else:
                    kl_s, kl_t = _jsd_sums_segment(
                        zs_row, zt_row, 0, n_cols, m_s, m_t, lg_s, lg_t, scale2, beta, BLOCK_V, FAST_LOG, STAGES
                    )
                    loss = beta * kl_t + (1.0 - beta) * kl_s
                    _jsd_grad_segment(
                        zs_row, zt_row, 0, n_cols, m_s, m_t, lg_s, lg_t, kl_s, scale2, beta,
                        (1.0 - beta) * grad_scale, BLOCK_V, FAST_LOG, STAGES,
                    )
                tl.store(loss_ptr + row, loss)
                for k in range(1, n_parts):
                    tl.store(loss_ptr + k * loss_stride + row, 0.0)


# ---------------------------------------------------------------------------------------------
# Launch geometry
# ---------------------------------------------------------------------------------------------


def _block_v(n_cols: int, device: torch.device) -> int:
    block = KERNEL_CONFIG["block_v"] if device.type == "cuda" else _INTERPRET_BLOCK_V
    return min(block, triton.next_power_of_2(max(n_cols, 2 * _GROUP)))


def default_split(rows: int, n_cols: int, device: torch.device) -> int:
    """Vocab segments per row so that ``rows x segments`` programs fill the GPU several times."""
    if triton is None:
        return 1
    n_slices = triton.cdiv(n_cols, _block_v(n_cols, device))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = KERNEL_CONFIG["programs_per_sm"] * sms
    else:
        target = 3 * max(rows, 1)  # a few segments, so the interpreted tests cover them
    return max(1, min(n_slices, triton.cdiv(target, max(rows, 1))))


def _launch(zs: torch.Tensor, split: int, block_v, num_warps, num_stages) -> dict:
    """Segment length and the launch constants for a ``(rows, split)`` grid over ``zs``."""
    n_cols = zs.shape[1]
    block_v = block_v or _block_v(n_cols, zs.device)
    seg_len = triton.cdiv(triton.cdiv(n_cols, block_v), split) * block_v
    return dict(
        seg_len=seg_len,
        BLOCK_V=block_v,
        STAGES=num_stages or KERNEL_CONFIG["num_stages"],
        num_warps=num_warps or KERNEL_CONFIG["num_warps"],
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sp_setting(name: str, kind: str):
    """A single-pass launch setting: KERNEL_CONFIG["sp_<name>"] if set, else the kind's default."""
    value = KERNEL_CONFIG.get(f"sp_{name}")
    return SP_DEFAULTS["jsd" if kind == "jsd" else "kl"][name] if value is None else value


def _sp_block_v(n_cols: int, device: torch.device, kind: str = "forward_kl") -> int:
    block = _sp_setting("block_v", kind) if device.type == "cuda" else _INTERPRET_BLOCK_V
    return min(block, triton.next_power_of_2(max(n_cols, 2 * _GROUP)))


def single_pass_split(
    n_cols: int,
    device: torch.device,
    segments: int | None = None,
    block_v: int | None = None,
    kind: str = "forward_kl",
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Programs per row (vocab segments) of ``single_pass_loss_grad_`` on ``device`` for
    ``kind`` and logits of ``dtype``: the cluster size for the "cluster" kernel where it runs
    (bf16, sm_90+), else about ``segments`` (default: the kind's setting) on CUDA, none empty; 1
    under the interpreter, which runs programs one after the other (peers of a row would wait
    for ever)."""
    if triton is None or device.type != "cuda" or _interpreting():
        return 1
    if _variant(variant, kind) == "cluster" and dtype == torch.bfloat16 and _cluster_runs(device):
        return cluster_build(kind).cluster
    n_slices = triton.cdiv(n_cols, block_v or _sp_block_v(n_cols, device, kind))
    per_segment = triton.cdiv(n_slices, segments or _sp_setting("segments", kind))
    return triton.cdiv(n_slices, per_segment)


def cluster_build(kind: str, num_warps: int | None = None) -> cluster.Build:
    """The cluster kernel's build for ``kind``: KERNEL_CONFIG["cluster_build"] (one name, or
    "kl:<name>,jsd:<name>") or else ``CLUSTER_BUILDS``; ``num_warps`` sets its block size."""
    group = "jsd" if kind == "jsd" else "kl"
    build = _parse_cluster_setting(KERNEL_CONFIG.get("cluster_build") or CLUSTER_BUILDS[group], group)
    return dataclasses.replace(build, threads=32 * num_warps) if num_warps else build


@functools.lru_cache(maxsize=16)
def _parse_cluster_setting(setting: str, group: str) -> cluster.Build:
    # cached: every single-pass call asks, and the setting rarely changes
    where = f"KERNEL_CONFIG['cluster_build'] / $MEGATRON_DISTILL_CLUSTER_BUILD = {setting!r}"
    name = setting
    if ":" in setting:
        try:
            per_group = dict(item.split(":", 1) for item in setting.split(","))
        except ValueError:
            per_group = {}
        if set(per_group) - {"kl", "jsd"} or group not in per_group:
            raise ValueError(f"{where}: neither one build name nor 'kl:<name>,jsd:<name>'")
        name = per_group[group]
    try:
        build = cluster.parse_build(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return build


def _cluster_runs(device: torch.device) -> bool:
    """Whether the "cluster" variant may run the cluster kernel on ``device`` (shapes aside)."""
    return bool(KERNEL_CONFIG["cluster_kernel"]) and cluster.device_supports(device)


def _variant(variant: str | None, kind: str) -> str:
    variant = variant or _sp_setting("variant", kind)
    if variant not in SP_VARIANTS:
        raise ValueError(f"single-pass variant (KERNEL_CONFIG['sp_variant'] / $MEGATRON_DISTILL_SP_VARIANT) must "
                         f"be one of {SP_VARIANTS}, got {variant!r}")
    return variant


_FIT: dict = {}  # launch constants -> programs per multiprocessor that fit (measured)
_POISON = -(1 << 30)  # a meeting counter that timed out (_meet); arrivals keep it negative


def _programs_per_sm(kernel, num_warps: int, device: torch.device) -> int | None:
    """How many programs of a compiled kernel fit on one multiprocessor at once."""
    try:
        n_regs = int(kernel.n_regs)
        shared = int(kernel.metadata.shared)
    except Exception:  # pragma: no cover - metadata layout differs between Triton versions
        return None
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    fit = min(65536 // (regs_per_warp * num_warps), 64 // num_warps, 32)
    if shared > 0:
        fit = min(fit, smem // (shared + 1024))
    return max(fit, 1)


def _check_pair(zs: torch.Tensor, zt: torch.Tensor) -> None:
    if zs.dim() != 2 or zs.shape != zt.shape:
        raise ValueError(f"student {tuple(zs.shape)} and teacher {tuple(zt.shape)} logits must be equal 2-D")
    if zs.stride(1) != 1 or zt.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _fast_log(zs: torch.Tensor) -> bool:
    return zs.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


# ---------------------------------------------------------------------------------------------
# Plain PyTorch twins: the same quantities, same layout, same base-2 conventions, S = 1.
# ---------------------------------------------------------------------------------------------


def combine_stats(stats: torch.Tensor, temperature: float) -> torch.Tensor:
    """Fold partial statistics ``[5, S, rows]`` into ``[5, 1, rows]`` (max, then rescaled sums)."""
    if stats.shape[1] == 1:
        return stats
    scale2 = LOG2E / temperature
    m = stats[:2].amax(dim=1, keepdim=True)
    w = torch.exp2((stats[:2] - m) * scale2)
    sums = torch.stack([w[0] * stats[2], w[1] * stats[3], w[0] * stats[4]]).sum(dim=1, keepdim=True)
    return torch.cat([m, sums])


def _torch_stats(zs: torch.Tensor, zt: torch.Tensor, scale2: float, want_cross: bool) -> torch.Tensor:
    zs = zs.float()
    zt = zt.float()
    m_s = zs.amax(dim=1)
    m_t = zt.amax(dim=1)
    es = torch.exp2((zs - m_s[:, None]) * scale2)
    l_s = es.sum(dim=1)
    l_t = torch.exp2((zt - m_t[:, None]) * scale2).sum(dim=1)
    a = (es * ((zs - zt) * scale2)).sum(dim=1) if want_cross else torch.zeros_like(l_s)
    return torch.stack([m_s, m_t, l_s, l_t, a])[:, None, :]


def _torch_logp2(zs, zt, stats, temperature):
    scale2 = LOG2E / temperature
    st = combine_stats(stats, temperature)[:, 0]
    lg_s = torch.log2(st[2])
    lg_t = torch.log2(st[3])
    ls = (zs.float() - st[0][:, None]) * scale2 - lg_s[:, None]
    lt = (zt.float() - st[1][:, None]) * scale2 - lg_t[:, None]
    rkl = LN2 * (st[4] / st[2] - ((st[0] - st[1]) * scale2 + lg_s - lg_t))
    return ls, lt, rkl


def _torch_jsd_mix(ls, lt, beta):
    ps = torch.exp2(ls)
    pt = torch.exp2(lt)
    mix = beta * pt + (1.0 - beta) * ps
    valid = mix > 0
    lm = torch.log2(torch.where(valid, mix, torch.ones_like(mix)))
    return ps, pt, lm, valid


def _write_parts(out: torch.Tensor, value: torch.Tensor) -> None:
    out[0].copy_(value)
    out[1:].zero_()


# ---------------------------------------------------------------------------------------------
# Entry points (launchers). ``impl`` is "triton" or "torch".
# ---------------------------------------------------------------------------------------------


def row_stats(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    want_cross: bool,
    impl: str = "triton",
    *,
    split: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Partial softmax statistics of ``zs / tau`` and ``zt / tau`` (both ``[rows, V_local]``).

    Returns fp32 ``[5, S, rows]`` (S vocab segments; 1 for the torch twin): ``m_s, m_t, l_s,
    l_t, a`` as in the module docstring; ``a`` (reverse KL) only when ``want_cross``, else 0.
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    if impl == "torch":
        return _torch_stats(zs, zt, scale2, want_cross)
    rows, n_cols = zs.shape
    split = split or default_split(rows, n_cols, zs.device)
    stats = torch.empty((N_STATS, split, rows), dtype=torch.float32, device=zs.device)
    if rows == 0:
        return stats
    cfg = _launch(zs, split, block_v, num_warps, num_stages)
    seg_len = cfg.pop("seg_len")
    _row_stats_kernel[(rows, split)](
        zs, zt, zs.stride(0), zt.stride(0), stats, rows, n_cols, seg_len, scale2,
        WANT_CROSS=want_cross, GROUP=_GROUP, **cfg,
    )
    return stats


def kl_loss_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    reverse: bool,
    temperature: float,
    grad_scale: float,
    impl: str = "triton",
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Forward (``reverse=False``) or reverse KL on one chunk; overwrites ``zs`` with dz.

    ``zs``, ``zt``: ``[rows, V_local]`` logits; ``stats``: ``[5, S, rows]`` from ``row_stats``
    (reduced over the TP group where there is one). ``loss_out``: fp32 ``[P, rows]`` (rows
    contiguous) receives this shard's part of each row's divergence, split over P vocab
    segments (one partial per segment; P sets the grid). On return ``zs`` holds
    ``grad_scale / tau * d KL / d s`` (s = z / tau) in its own dtype.
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    g = grad_scale / temperature
    if impl == "torch":
        ls, lt, rkl = _torch_logp2(zs, zt, stats, temperature)
        ps = torch.exp2(ls)
        if reverse:
            dz = ps * (LN2 * (ls - lt) - rkl[:, None])
            term = ps * (ls - lt)
        else:
            pt = torch.exp2(lt)
            dz = ps - pt
            term = pt * (lt - ls)
        _write_parts(loss_out, LN2 * term.sum(dim=1))
        zs.copy_(dz * g)
        return
    rows, n_cols = zs.shape
    if rows == 0:
        return
    split = loss_out.shape[0]
    cfg = _launch(zs, split, block_v, num_warps, num_stages)
    seg_len = cfg.pop("seg_len")
    _kl_loss_grad_kernel[(rows, split)](
        zs, zt, zs.stride(0), zt.stride(0), stats, stats.shape[1], loss_out, loss_out.stride(0),
        rows, n_cols, seg_len, scale2, g,
        REVERSE=reverse, PARTS=_pow2(stats.shape[1]), **cfg,
    )


def jsd_row_sums(
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    impl: str = "triton",
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """This shard's KL(p_S || M) per row, as partials ``[P, rows]`` over P vocab segments.

    ``stats``: ``[5, S, rows]`` (reduced over TP). ``loss_out`` (fp32 ``[P, rows]``, P sets the
    grid) receives the partial JSD_beta loss of each row. For 0 < beta < 1.
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    if impl == "torch":
        ls, lt, _ = _torch_logp2(zs, zt, stats, temperature)
        ps, pt, lm, valid = _torch_jsd_mix(ls, lt, beta)
        zero = torch.zeros((), dtype=ps.dtype, device=ps.device)
        kl_s = LN2 * torch.where(valid, ps * (ls - lm), zero).sum(dim=1)
        kl_t = LN2 * torch.where(valid, pt * (lt - lm), zero).sum(dim=1)
        _write_parts(loss_out, beta * kl_t + (1.0 - beta) * kl_s)
        return kl_s[None]
    rows, n_cols = zs.shape
    split = loss_out.shape[0]
    kl = torch.empty((split, rows), dtype=torch.float32, device=zs.device)
    if rows == 0:
        return kl
    cfg = _launch(zs, split, block_v, num_warps, num_stages)
    seg_len = cfg.pop("seg_len")
    _jsd_row_sums_kernel[(rows, split)](
        zs, zt, zs.stride(0), zt.stride(0), stats, stats.shape[1], kl, loss_out, loss_out.stride(0),
        rows, n_cols, seg_len, scale2, beta,
        PARTS=_pow2(stats.shape[1]), FAST_LOG=_fast_log(zs), **cfg,
    )
    return kl


def jsd_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    kl_s: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    grad_scale: float,
    impl: str = "triton",
    split: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Overwrite ``zs`` (``[rows, V_local]``) with ``grad_scale / tau * d JSD_beta / d s``.

    ``stats`` ``[5, S, rows]`` and ``kl_s`` (KL(p_S || M), partials ``[P, rows]``) must already
    be reduced over the TP group. For 0 < beta < 1 (beta 0 / 1 are the KL kernels).
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    g = grad_scale / temperature
    if impl == "torch":
        ls, lt, _ = _torch_logp2(zs, zt, stats, temperature)
        ps, _, lm, valid = _torch_jsd_mix(ls, lt, beta)
        dz = ps * (LN2 * (ls - lm) - kl_s.sum(dim=0)[:, None])
        zs.copy_(torch.where(valid, dz, torch.zeros((), device=ps.device)) * ((1.0 - beta) * g))
        return
    rows, n_cols = zs.shape
    if rows == 0:
        return
    split = split or default_split(rows, n_cols, zs.device)
    cfg = _launch(zs, split, block_v, num_warps, num_stages)
    seg_len = cfg.pop("seg_len")
    _jsd_grad_kernel[(rows, split)](
        zs, zt, zs.stride(0), zt.stride(0), stats, stats.shape[1], kl_s, kl_s.shape[0],
        rows, n_cols, seg_len, scale2, beta, g,
        PARTS=_pow2(stats.shape[1]), KL_PARTS=_pow2(kl_s.shape[0]), FAST_LOG=_fast_log(zs), **cfg,
    )


_KINDS = cluster.KIND_CODES


def single_pass_loss_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    grad_scale: float,
    impl: str = "triton",
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs_per_sm: int | None = None,
    variant: str | None = None,
) -> torch.Tensor | None:
    """Whole-vocabulary rows only (one process, no TP): loss partials and dz in one launch.

    Equivalent to ``row_stats`` + ``kl_loss_grad_`` (``kind`` "forward_kl" / "reverse_kl") or
    ``row_stats`` + ``jsd_row_sums`` + ``jsd_grad_`` ("jsd", 0 < beta < 1) on rows that hold the
    whole vocabulary. ``loss_out``: fp32 ``[P, rows]`` (rows contiguous), P = vocab segments
    per row (``single_pass_split`` with the same settings; 1 for the torch twin and the
    interpreter by default), receives each row's divergence as P partials. On return ``zs``
    holds ``grad_scale / tau * d loss / d s``. Launch settings left None come from
    KERNEL_CONFIG["sp_*"] or else ``SP_DEFAULTS``; ``variant`` is one of ``SP_VARIANTS``.

    The programs sharing a row wait for each other's partial statistics. With the "reread"
    kernel a program that has polled KERNEL_CONFIG["sp_max_polls"] times without seeing all of
    them (they are not resident: other kernels hold multiprocessors) marks the row, nobody
    writes its dz, and a second, short launch redoes each marked row with one program; so a
    launch cannot hang. The interpreter, which runs programs one at a time, takes that path for
    every row that has several programs. The "pipelined" kernel waits without bound.

    The "cluster" kernel (``cluster_single_pass``) needs none of that: its blocks of a row meet
    behind the hardware cluster barrier and clusters never wait on each other. It runs where
    ``cluster.usable`` holds and ``loss_out`` has the build's cluster size of partial rows; elsewhere
    (fp32 logits, rows not of 16-byte vectors, before Hopper, NVRTC missing) "cluster" means
    "reread".

    Returns the rows' meeting counters, int32 ``[2, rows]`` (negative: the row timed out and was
    redone), or None where no Triton kernel ran (the torch twin, the cluster kernel, no rows).
    """
    _check_pair(zs, zt)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    if impl == "torch":
        stats = row_stats(zs, zt, temperature, kind == "reverse_kl", "torch")
        common = dict(temperature=temperature, impl="torch")
        if kind == "jsd":
            kl_s = jsd_row_sums(zs, zt, stats, loss_out, beta=beta, **common)
            jsd_grad_(zs, zt, stats, kl_s, beta=beta, grad_scale=grad_scale, **common)
        else:
            kl_loss_grad_(zs, zt, stats, loss_out, reverse=kind == "reverse_kl", grad_scale=grad_scale, **common)
        return None
    rows, n_cols = zs.shape
    if rows == 0:
        return None
    n_parts = loss_out.shape[0]
    device = zs.device
    variant = _variant(variant, kind)
    if variant == "cluster":
        # num_warps, when given, sets the cluster kernel's block size too (the sweep's knob)
        build = cluster_build(kind, num_warps)
        if n_parts == build.cluster and _cluster_runs(device) and cluster.usable(zs, zt, build):
            try:
                cluster.loss_grad_(zs, zt, loss_out, kind=kind, beta=beta, scale2=LOG2E / temperature,
                                   grad_scale=grad_scale / temperature, build=build)
                return None
            except RuntimeError as exc:  # NVRTC or the driver refused: the Triton kernel from now on
                warnings.warn(f"cluster single-pass kernel unavailable, using the Triton kernel: {exc}", stacklevel=2)
        variant = "reread"
    interpreted = device.type != "cuda" or _interpreting()
    if n_parts > 1 and interpreted and variant == "pipelined":
        raise ValueError("the interpreter runs one program at a time: the pipelined kernel needs 1 partial row")
    # the interpreter runs the programs one after another: a program waiting for a peer that
    # comes later never sees it, so it gives up at once and the repair kernel does the row
    max_polls = 2 if interpreted else int(KERNEL_CONFIG["sp_max_polls"])
    block_v = block_v or _sp_block_v(n_cols, device, kind)
    num_warps = num_warps or _sp_setting("num_warps", kind)
    num_stages = num_stages or _sp_setting("num_stages", kind)
    fast_log = _fast_log(zs)
    seg_len = triton.cdiv(triton.cdiv(n_cols, block_v), n_parts) * block_v
    key = (str(device), zs.dtype, zt.dtype, kind, block_v, num_warps, num_stages, fast_log, variant)
    if device.type == "cuda":
        # the programs of a row wait for each other, so the grid should be resident at once:
        # until the compiled kernel's registers / shared memory are known, one program per
        # multiprocessor
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        per_sm = min(programs_per_sm or _sp_setting("programs_per_sm", kind), _FIT.get(key, 1))
        n_prog = per_sm * sms
    else:
        n_prog = 4  # a few rows per program, so the interpreted tests cover the loop
    n_prog = max(min(n_prog, rows * n_parts) // n_parts, 1) * n_parts
    part = torch.empty((6, n_parts, rows), dtype=torch.float32, device=device)
    counters = torch.zeros((2, rows), dtype=torch.int32, device=device)
    scale2 = LOG2E / temperature
    args = [zs, zt, zs.stride(0), zt.stride(0), part, counters, loss_out, loss_out.stride(0),
            rows, n_cols, seg_len, n_parts, scale2, float(beta), grad_scale / temperature]
    consts = dict(KIND=_KINDS[kind], BLOCK_V=block_v, GROUP=_GROUP, STAGES=num_stages, FAST_LOG=fast_log)
    if variant == "reread":
        compiled = _single_pass_kernel[(n_prog,)](
            *args, max_polls, PARTS=_pow2(n_parts), POISON=_POISON, num_warps=num_warps, **consts
        )
        # rows whose programs gave up waiting for each other (normally none: a short launch)
        _repair_kernel[(min(n_prog, rows),)](
            zs, zt, zs.stride(0), zt.stride(0), counters, loss_out, loss_out.stride(0), rows, n_cols, n_parts,
            scale2, float(beta), grad_scale / temperature, num_warps=num_warps, **consts,
        )
    else:
        compiled = _pipelined_kernel[(n_prog,)](*args, PARTS=_pow2(n_parts), num_warps=num_warps, **consts)
    if device.type == "cuda" and key not in _FIT:
        _FIT[key] = _programs_per_sm(compiled, num_warps, device) or 1
    return counters


__all__ = [
    "LN2",
    "LOG2E",
    "CLUSTER_BUILDS",
    "KERNEL_CONFIG",
    "N_STATS",
    "SP_DEFAULTS",
    "SP_VARIANTS",
    "cluster_build",
    "combine_stats",
    "default_split",
    "jsd_grad_",
    "jsd_row_sums",
    "kl_loss_grad_",
    "row_stats",
    "single_pass_loss_grad_",
    "single_pass_split",
    "triton_available",
]
