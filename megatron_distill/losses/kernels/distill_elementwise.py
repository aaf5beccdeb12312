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

Each entry point has a plain PyTorch twin (``impl="torch"``, one partial, S = 1) computing the
same quantities, used where Triton cannot run and as the kernels' reference in the tests.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch-only installs use impl="torch"
    triton = None
    tl = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
N_STATS = 5

# Launch configuration on CUDA (benchmarks/loss_kernel.py --kernel-sweep measures the options):
# a slice of 4096 bf16 elements is two 16-byte loads per tensor per thread with 8 warps;
# num_stages > 1 lets Triton prefetch the next slices (cp.async) while this one is computed;
# the grid gets about programs_per_sm programs per multiprocessor.
KERNEL_CONFIG = dict(block_v=4096, num_warps=8, num_stages=3, programs_per_sm=16)
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
    def _combined_stats(stats_ptr, row, n_rows, n_parts, scale2, PARTS: tl.constexpr):
        # Fold the segments' partial statistics of one row: max, then rescaled sums.
        # Returns m_s, m_t and log2 of the row's sum-exps, and a / l_s (reverse KL term).
        idx = tl.arange(0, PARTS)
        valid = idx < n_parts
        plane = n_parts * n_rows
        p = stats_ptr + idx * n_rows + row
        ms = tl.load(p, mask=valid, other=float("-inf"))
        mt = tl.load(p + plane, mask=valid, other=float("-inf"))
        m_s = tl.max(ms, axis=0)
        m_t = tl.max(mt, axis=0)
        ws = tl.where(valid, tl.exp2((ms - m_s) * scale2), 0.0)
        wt = tl.where(valid, tl.exp2((mt - m_t) * scale2), 0.0)
        l_s = tl.sum(ws * tl.load(p + 2 * plane, mask=valid, other=0.0), axis=0)
        l_t = tl.sum(wt * tl.load(p + 3 * plane, mask=valid, other=0.0), axis=0)
        a = tl.sum(ws * tl.load(p + 4 * plane, mask=valid, other=0.0), axis=0)
        return m_s, m_t, tl.log2(l_s), tl.log2(l_t), a / l_s

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
        # Reverse KL of the whole row (all shards): E_pS[s - t] - (lse_s - lse_t), natural log.
        # dz needs it before the row is revisited, and it is the only row-global term dz needs.
        rkl = (a_over_l - ((m_s - m_t) * scale2 + lg_s - lg_t)) * _LN2
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
            tl.store(zs_row + cols, (dz * grad_scale).to(zs_ptr.dtype.element_ty), mask=mask)
            acc += tl.where(mask, term, 0.0)
        tl.store(loss_ptr + tl.program_id(1) * loss_stride + row, tl.sum(acc, axis=0) * _LN2)

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
        kl_s = tl.sum(acc_s, axis=0) * _LN2
        kl_t = tl.sum(acc_t, axis=0) * _LN2
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
        scale = (1.0 - beta) * grad_scale
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
            tl.store(zs_row + cols, (dz * scale).to(zs_ptr.dtype.element_ty), mask=mask)


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


__all__ = [
    "LN2",
    "LOG2E",
    "KERNEL_CONFIG",
    "N_STATS",
    "combine_stats",
    "default_split",
    "jsd_grad_",
    "jsd_row_sums",
    "kl_loss_grad_",
    "row_stats",
    "triton_available",
]
