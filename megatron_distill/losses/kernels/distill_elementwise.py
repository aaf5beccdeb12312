"""Element-wise part of the fused output-layer + distillation loss: per-row softmax statistics,
loss terms and d loss / d student-logits, for one token chunk of vocab-parallel logits.

Everything here works on two ``[rows, V_local]`` logits buffers (student ``zs``, teacher ``zt``,
bf16 or fp32, rows contiguous) and computes in fp32. The matrix products around it live in
``losses/fused.py``; so do the tensor-parallel all-reduces, which is why the work is split into
passes that each read the chunk once:

* ``row_stats``: online max / sum-exp of both tempered rows (and, for reverse KL, the
  p_S-weighted sum of (s - t), which gives the per-token reverse KL once the normalisers are
  known). Exponentials are base 2 so each element costs one ``exp2``.
* ``kl_loss_grad_``: forward / reverse KL per-row loss, and dz written in place over ``zs``.
  With ``stats=None`` it first computes the statistics itself (one kernel at TP = 1).
* ``jsd_row_sums`` then ``jsd_grad_``: JSD's gradient needs KL(p_S || M) of the whole row
  (all TP shards) before any element of dz can be written, hence a third pass.

Statistics layout (fp32 ``[5, rows]``): ``m_s, m_t`` (row maxima of the raw logits z),
``l_s, l_t`` (sum of 2^((z - m) c), c = log2(e) / tau), ``a`` (sum of 2^((z_s - m_s) c) (z_s - z_t) c);
the two maxima are adjacent so one MAX all-reduce covers them, and the three sums are adjacent
for one SUM all-reduce. Maxima stay in logit units because z - m is exact for bf16 logits: the
log-probabilities (z - m) c - log2(l) then carry no rounding of a large z c, which matters for
JSD's gradient, a difference of nearly equal log-probabilities.

Each entry point has a plain PyTorch twin (``impl="torch"``) computing the same quantities,
used where Triton cannot run and as the kernels' reference in the tests.
"""

from __future__ import annotations

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

# One program per row streams the row in BLOCK_V slices; 4096 bf16 elements per slice keep
# 16 values per thread (two 16-byte loads per tensor) with 8 warps.
_DEFAULT_BLOCK_V = 4096
_DEFAULT_NUM_WARPS = 8
_INTERPRET_BLOCK_V = 1024  # the interpreter runs one numpy op per statement: wide is faster


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA, or the CPU interpreter)."""
    import os

    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    _LN2 = tl.constexpr(LN2)  # kernels may only read globals that are constexpr

    @triton.jit
    def _online_stats(zs_row, zt_row, n_cols, scale2, WANT_CROSS: tl.constexpr, BLOCK_V: tl.constexpr):
        # One scalar max per slice (one reduction) rather than per-lane maxima, so each element
        # costs a single exp2: at bf16 the pass is memory-bound only if exp2 stays at one.
        offs = tl.arange(0, BLOCK_V)
        m_s = float("-inf")
        m_t = float("-inf")
        l_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        l_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        a = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            zs = tl.load(zs_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            zt = tl.load(zt_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            ms_new = tl.maximum(m_s, tl.max(zs, axis=0))
            mt_new = tl.maximum(m_t, tl.max(zt, axis=0))
            alpha_s = tl.exp2((m_s - ms_new) * scale2)
            es = tl.exp2((zs - ms_new) * scale2)
            l_s = l_s * alpha_s + es
            l_t = l_t * tl.exp2((m_t - mt_new) * scale2) + tl.exp2((zt - mt_new) * scale2)
            if WANT_CROSS:
                # masked lanes hold -inf: subtract zeros there instead, so no nan is formed
                diff = (tl.where(mask, zs, 0.0) - tl.where(mask, zt, 0.0)) * scale2
                a = a * alpha_s + es * diff
            m_s = ms_new
            m_t = mt_new
        return m_s, tl.sum(l_s, axis=0), m_t, tl.sum(l_t, axis=0), tl.sum(a, axis=0)

    @triton.jit
    def _load_stats(stats_ptr, row, n_rows):
        m_s = tl.load(stats_ptr + row)
        m_t = tl.load(stats_ptr + n_rows + row)
        l_s = tl.load(stats_ptr + 2 * n_rows + row)
        l_t = tl.load(stats_ptr + 3 * n_rows + row)
        a = tl.load(stats_ptr + 4 * n_rows + row)
        return m_s, l_s, m_t, l_t, a

    @triton.jit
    def _store_stats(stats_ptr, row, n_rows, m_s, l_s, m_t, l_t, a):
        tl.store(stats_ptr + row, m_s)
        tl.store(stats_ptr + n_rows + row, m_t)
        tl.store(stats_ptr + 2 * n_rows + row, l_s)
        tl.store(stats_ptr + 3 * n_rows + row, l_t)
        tl.store(stats_ptr + 4 * n_rows + row, a)

    @triton.jit
    def _row_stats_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, n_rows, n_cols, scale2,
        WANT_CROSS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        m_s, l_s, m_t, l_t, a = _online_stats(zs_row, zt_row, n_cols, scale2, WANT_CROSS, BLOCK_V)
        _store_stats(stats_ptr, row, n_rows, m_s, l_s, m_t, l_t, a)

    @triton.jit
    def _kl_loss_grad_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, loss_ptr, n_rows, n_cols, scale2, grad_scale,
        REVERSE: tl.constexpr, STATS_IN_KERNEL: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        if STATS_IN_KERNEL:
            m_s, l_s, m_t, l_t, a = _online_stats(zs_row, zt_row, n_cols, scale2, REVERSE, BLOCK_V)
        else:
            m_s, l_s, m_t, l_t, a = _load_stats(stats_ptr, row, n_rows)
        lg_s = tl.log2(l_s)
        lg_t = tl.log2(l_t)
        # Reverse KL of the whole row (all shards): E_pS[s - t] - (lse_s - lse_t), natural log.
        # dz needs it before the row is revisited, and it is the only row-global term dz needs.
        rkl = (a / l_s - ((m_s - m_t) * scale2 + lg_s - lg_t)) * _LN2
        offs = tl.arange(0, BLOCK_V)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            ls = (tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            ps = tl.exp2(ls)
            pt = tl.exp2(lt)
            if REVERSE:
                dz = ps * ((ls - lt) * _LN2 - rkl)
                term = ps * (ls - lt)
            else:
                dz = ps - pt
                term = pt * (lt - ls)
            tl.store(zs_row + cols, (dz * grad_scale).to(zs_ptr.dtype.element_ty), mask=mask)
            acc += tl.where(mask, term, 0.0)
        tl.store(loss_ptr + row, tl.sum(acc, axis=0) * _LN2)

    @triton.jit
    def _jsd_row_sums_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, sums_ptr, n_rows, n_cols, scale2, beta,
        STATS_IN_KERNEL: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        if STATS_IN_KERNEL:
            m_s, l_s, m_t, l_t, a = _online_stats(zs_row, zt_row, n_cols, scale2, False, BLOCK_V)
            _store_stats(stats_ptr, row, n_rows, m_s, l_s, m_t, l_t, a)
        else:
            m_s, l_s, m_t, l_t, a = _load_stats(stats_ptr, row, n_rows)
        lg_s = tl.log2(l_s)
        lg_t = tl.log2(l_t)
        offs = tl.arange(0, BLOCK_V)
        acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            ls = (tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            ps = tl.exp2(ls)
            pt = tl.exp2(lt)
            mix = beta * pt + (1.0 - beta) * ps
            # both probabilities underflowed: the element contributes nothing, and log2(0) must
            # not turn 0 * -inf into nan
            valid = mask & (mix > 0.0)
            lm = tl.log2(tl.where(valid, mix, 1.0))
            acc_s += tl.where(valid, ps * (ls - lm), 0.0)
            acc_t += tl.where(valid, pt * (lt - lm), 0.0)
        kl_s = tl.sum(acc_s, axis=0) * _LN2
        kl_t = tl.sum(acc_t, axis=0) * _LN2
        tl.store(sums_ptr + row, kl_s)
        tl.store(sums_ptr + n_rows + row, beta * kl_t + (1.0 - beta) * kl_s)

    @triton.jit
    def _jsd_grad_kernel(
        zs_ptr, zt_ptr, stride_s, stride_t, stats_ptr, sums_ptr, n_rows, n_cols, scale2, beta, grad_scale,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        zs_row = zs_ptr + row.to(tl.int64) * stride_s
        zt_row = zt_ptr + row.to(tl.int64) * stride_t
        m_s, l_s, m_t, l_t, a = _load_stats(stats_ptr, row, n_rows)
        lg_s = tl.log2(l_s)
        lg_t = tl.log2(l_t)
        kl_s = tl.load(sums_ptr + row)
        scale = (1.0 - beta) * grad_scale
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            ls = (tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32) - m_s) * scale2 - lg_s
            lt = (tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32) - m_t) * scale2 - lg_t
            ps = tl.exp2(ls)
            mix = beta * tl.exp2(lt) + (1.0 - beta) * ps
            valid = mix > 0.0
            lm = tl.log2(tl.where(valid, mix, 1.0))
            dz = tl.where(valid, ps * ((ls - lm) * _LN2 - kl_s), 0.0)
            tl.store(zs_row + cols, (dz * scale).to(zs_ptr.dtype.element_ty), mask=mask)


def _launch_config(zs: torch.Tensor, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    n_cols = zs.shape[1]
    if block_v is None:
        block_v = _DEFAULT_BLOCK_V if zs.is_cuda else _INTERPRET_BLOCK_V
        block_v = min(block_v, triton.next_power_of_2(max(n_cols, 16)))
    return block_v, num_warps or _DEFAULT_NUM_WARPS


def _check_pair(zs: torch.Tensor, zt: torch.Tensor) -> None:
    if zs.dim() != 2 or zs.shape != zt.shape:
        raise ValueError(f"student {tuple(zs.shape)} and teacher {tuple(zt.shape)} logits must be equal 2-D")
    if zs.stride(1) != 1 or zt.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")


# ---------------------------------------------------------------------------------------------
# Plain PyTorch twins: the same quantities, same layout, same base-2 conventions.
# ---------------------------------------------------------------------------------------------


def _torch_stats(zs: torch.Tensor, zt: torch.Tensor, scale2: float, want_cross: bool) -> torch.Tensor:
    zs = zs.float()
    zt = zt.float()
    m_s = zs.amax(dim=1)
    m_t = zt.amax(dim=1)
    es = torch.exp2((zs - m_s[:, None]) * scale2)
    l_s = es.sum(dim=1)
    l_t = torch.exp2((zt - m_t[:, None]) * scale2).sum(dim=1)
    a = (es * ((zs - zt) * scale2)).sum(dim=1) if want_cross else torch.zeros_like(l_s)
    return torch.stack([m_s, m_t, l_s, l_t, a])


def _torch_logp2(zs, zt, stats, scale2):
    lg_s = torch.log2(stats[2])
    lg_t = torch.log2(stats[3])
    ls = (zs.float() - stats[0][:, None]) * scale2 - lg_s[:, None]
    lt = (zt.float() - stats[1][:, None]) * scale2 - lg_t[:, None]
    return ls, lt, (stats[0] - stats[1]) * scale2 + lg_s - lg_t


def _torch_kl_loss_grad_(zs, zt, stats, loss_out, reverse, scale2, grad_scale):
    ls, lt, lse_diff = _torch_logp2(zs, zt, stats, scale2)
    ps = torch.exp2(ls)
    if reverse:
        rkl = LN2 * (stats[4] / stats[2] - lse_diff)
        dz = ps * (LN2 * (ls - lt) - rkl[:, None])
        term = ps * (ls - lt)
    else:
        pt = torch.exp2(lt)
        dz = ps - pt
        term = pt * (lt - ls)
    loss_out.copy_(LN2 * term.sum(dim=1))
    zs.copy_(dz * grad_scale)


def _torch_jsd_mix(ls, lt, beta):
    ps = torch.exp2(ls)
    pt = torch.exp2(lt)
    mix = beta * pt + (1.0 - beta) * ps
    valid = mix > 0
    lm = torch.log2(torch.where(valid, mix, torch.ones_like(mix)))
    return ps, pt, lm, valid


def _torch_jsd_row_sums(zs, zt, stats, scale2, beta):
    ls, lt, _ = _torch_logp2(zs, zt, stats, scale2)
    ps, pt, lm, valid = _torch_jsd_mix(ls, lt, beta)
    zero = torch.zeros((), dtype=ps.dtype, device=ps.device)
    kl_s = LN2 * torch.where(valid, ps * (ls - lm), zero).sum(dim=1)
    kl_t = LN2 * torch.where(valid, pt * (lt - lm), zero).sum(dim=1)
    return torch.stack([kl_s, beta * kl_t + (1.0 - beta) * kl_s])


def _torch_jsd_grad_(zs, zt, stats, sums, scale2, beta, grad_scale):
    ls, lt, _ = _torch_logp2(zs, zt, stats, scale2)
    ps, _, lm, valid = _torch_jsd_mix(ls, lt, beta)
    dz = torch.where(valid, ps * (LN2 * (ls - lm) - sums[0][:, None]), torch.zeros((), device=ps.device))
    zs.copy_(dz * ((1.0 - beta) * grad_scale))


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
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per-row softmax statistics of ``zs / tau`` and ``zt / tau``, both ``[rows, V_local]``.

    Returns fp32 ``[5, rows]``: ``m_s, m_t, l_s, l_t, a`` in base 2 (see module docstring);
    ``a`` is only computed when ``want_cross`` (reverse KL), else zeros.
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    if impl == "torch":
        return _torch_stats(zs, zt, scale2, want_cross)
    rows, n_cols = zs.shape
    stats = torch.empty((N_STATS, rows), dtype=torch.float32, device=zs.device)
    if rows == 0:
        return stats
    block_v, num_warps = _launch_config(zs, block_v, num_warps)
    _row_stats_kernel[(rows,)](
        zs, zt, zs.stride(0), zt.stride(0), stats, rows, n_cols, scale2,
        WANT_CROSS=want_cross, BLOCK_V=block_v, num_warps=num_warps,
    )
    return stats


def kl_loss_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor | None,
    loss_out: torch.Tensor,
    *,
    reverse: bool,
    temperature: float,
    grad_scale: float,
    impl: str = "triton",
    block_v: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Forward (``reverse=False``) or reverse KL on one chunk; overwrites ``zs`` with dz.

    ``zs``, ``zt``: ``[rows, V_local]`` logits; ``stats``: ``[5, rows]`` from ``row_stats``
    already reduced over the TP group, or None to compute them here (single shard only).
    ``loss_out``: fp32 ``[rows]`` receives this shard's part of each row's divergence.
    On return ``zs`` holds ``grad_scale / tau * d KL / d s`` (s = z / tau) in its own dtype.
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    g = grad_scale / temperature
    if impl == "torch":
        if stats is None:
            stats = _torch_stats(zs, zt, scale2, reverse)
        _torch_kl_loss_grad_(zs, zt, stats, loss_out, reverse, scale2, g)
        return
    rows, n_cols = zs.shape
    if rows == 0:
        return
    block_v, num_warps = _launch_config(zs, block_v, num_warps)
    _kl_loss_grad_kernel[(rows,)](
        zs, zt, zs.stride(0), zt.stride(0), stats if stats is not None else loss_out, loss_out,
        rows, n_cols, scale2, g,
        REVERSE=reverse, STATS_IN_KERNEL=stats is None, BLOCK_V=block_v, num_warps=num_warps,
    )


def jsd_row_sums(
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    compute_stats: bool,
    impl: str = "triton",
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """This shard's part of KL(p_S || M) and of the JSD loss for each row: fp32 ``[2, rows]``.

    With ``compute_stats`` (single shard only) the statistics are computed here and written
    into ``stats`` (``[5, rows]``) for ``jsd_grad_``; otherwise ``stats`` is read.
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    if impl == "torch":
        if compute_stats:
            stats.copy_(_torch_stats(zs, zt, scale2, False))
        return _torch_jsd_row_sums(zs, zt, stats, scale2, beta)
    rows, n_cols = zs.shape
    sums = torch.empty((2, rows), dtype=torch.float32, device=zs.device)
    if rows == 0:
        return sums
    block_v, num_warps = _launch_config(zs, block_v, num_warps)
    _jsd_row_sums_kernel[(rows,)](
        zs, zt, zs.stride(0), zt.stride(0), stats, sums, rows, n_cols, scale2, beta,
        STATS_IN_KERNEL=compute_stats, BLOCK_V=block_v, num_warps=num_warps,
    )
    return sums


def jsd_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    sums: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    grad_scale: float,
    impl: str = "triton",
    block_v: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Overwrite ``zs`` (``[rows, V_local]``) with ``grad_scale / tau * d JSD_beta / d s``.

    ``stats`` ``[5, rows]`` and ``sums`` ``[2, rows]`` (row 0: KL(p_S || M)) must already be
    reduced over the TP group. For 0 < beta < 1 (beta 0 / 1 are the KL kernels).
    """
    _check_pair(zs, zt)
    scale2 = LOG2E / temperature
    g = grad_scale / temperature
    if impl == "torch":
        _torch_jsd_grad_(zs, zt, stats, sums, scale2, beta, g)
        return
    rows, n_cols = zs.shape
    if rows == 0:
        return
    block_v, num_warps = _launch_config(zs, block_v, num_warps)
    _jsd_grad_kernel[(rows,)](
        zs, zt, zs.stride(0), zt.stride(0), stats, sums, rows, n_cols, scale2, beta, g,
        BLOCK_V=block_v, num_warps=num_warps,
    )


__all__ = [
    "LN2",
    "LOG2E",
    "N_STATS",
    "jsd_grad_",
    "jsd_row_sums",
    "kl_loss_grad_",
    "row_stats",
    "triton_available",
]
