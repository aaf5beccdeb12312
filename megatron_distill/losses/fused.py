"""Fused vocab-parallel output layer + distillation loss (DESIGN.md, "Vocab-parallel loss
without gathering logits").

``fused_linear_distill_loss`` returns what ``reference.distill_loss`` returns on the logits
``student_hidden @ student_weight.T`` and ``teacher_hidden @ teacher_weight.T``, and the
gradients wrt ``student_hidden`` / ``student_weight``, while holding logits for one token chunk
only. Everything happens in the forward pass; backward only scales the stored gradients.

Per chunk of ``C`` (unmasked) tokens:

1. ``z_S = h_S W_S^T`` into a ``[C, V_local]`` buffer (cuBLAS, input dtype);
2. per teacher sub-chunk of ``C_t <= C`` rows: ``z_T = h_T W_T^T`` into a ``[C_t, V_local]``
   buffer, row statistics (max / sum-exp; Triton), all-reduced over TP (max, then sum), then
   the loss terms and dz = d loss / d z_S written in place over ``z_S`` (JSD needs one more
   all-reduced row sum, KL(p_S || M), between its statistics and dz);
3. ``grad_h[rows] = dz W_S`` and ``grad_W += dz^T h_S``.

With one process (no TP) step 2 can be one persistent Triton launch per teacher sub-chunk
(``ew.single_pass_loss_grad_``; the default, ``ew.KERNEL_CONFIG["single_pass"]``): the
programs sharing a row wait for each other's partial statistics and re-read their vocab
segment from L2, so the logits cross DRAM once (read z_S, z_T, write dz) instead of twice (KL)
or three times (JSD). The waits are bounded: rows whose programs are not all resident are
redone by a short second launch instead of hanging.

A teacher sub-chunk shorter than the chunk saves memory (teacher logits die once their rows'
dz is written, while the student buffer becomes dz, the operand of the weight-gradient GEMM,
whose cost per chunk includes a read and write of the whole ``[V_local, h_s]`` gradient). So in
the same memory the student chunk can be longer: fewer weight-gradient accumulations and longer
student GEMMs. With the single pass ``plan_chunks`` gives the teacher a quarter of the buffers
(1536 / 512 rows in case 1 of the benchmark instead of 1024 / 1024: 0.005-0.02x of the floor
faster on an H100, never slower); with TP the halves stay, as every teacher sub-chunk costs
all-reduces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_distill.losses.kernels import distill_elementwise as ew
from megatron_distill.losses.output_layer_grads import OutputLayerGrads, counted_tokens, rows, scale_saved_grads
from megatron_distill.losses.reference import check_loss_args
from megatron_distill.losses.tp_collectives import (
    ProcessGroup,
    all_gather_dim0,
    all_reduce_max_,
    all_reduce_sum_,
    group_size,
)

IMPL_ENV = "MEGATRON_DISTILL_FUSED_IMPL"
IMPLS = ("triton", "torch")
REDUCTIONS = ("mean", "sum")

# Logits buffers (student chunk + teacher sub-chunk) get at least this much memory (see
# plan_chunks and benchmarks/NOTES_loss_kernel.md for the measurements behind the rule).
_MIN_BUFFER_BYTES = 256 << 20
_ROW_ALIGN = 128  # whole 128-row GEMM tiles


@dataclass(frozen=True)
class _Config:
    kind: str
    beta: float
    temperature: float
    tp_group: ProcessGroup
    chunk_tokens: int | None
    teacher_chunk_tokens: int | None
    sequence_parallel: bool
    reduction: str
    impl: str
    fp32_weight_grad: bool


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """The element-wise implementation to use: ``impl``, else $MEGATRON_DISTILL_FUSED_IMPL,
    else "triton" where Triton can run on ``device`` (CUDA, or TRITON_INTERPRET=1), else "torch".
    """
    impl = impl or os.environ.get(IMPL_ENV) or None
    if impl is None:
        return "triton" if ew.triton_available(device) else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not ew.triton_available(device):
        raise ValueError(f"impl='triton' cannot run on {device} (set TRITON_INTERPRET=1 on the CPU)")
    return impl


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _balanced(n: int, max_len: int, align: int) -> int:
    """Chunk length <= ~max_len that splits n into equal chunks (no short last chunk)."""
    n_chunks = -(-n // max(max_len, 1))
    return min(n, _round_up(-(-n // n_chunks), align))


def _free_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: free device memory plus the caching
    allocator's idle blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    # the nested statistics are one C++ call; torch.cuda.memory_reserved / memory_allocated each
    # flatten them in Python (~0.2 ms apiece), and this runs before every loss call's first GEMM
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    if stats:
        free += stats["reserved_bytes"]["all"]["current"] - stats["allocated_bytes"]["all"]["current"]
    return free


def plan_chunks(
    n_rows: int,
    v_local: int,
    hidden: int,
    elem_bytes: int,
    device: torch.device,
    chunk_tokens: int | None = None,
    teacher_chunk_tokens: int | None = None,
    teacher_quarter: bool = False,
) -> tuple[int, int]:
    """Rows per student chunk ``C`` and per teacher sub-chunk ``C_t`` (``C_t <= C``).

    Without overrides the two logits buffers, ``(C + C_t) * V_local * elem_bytes``, get as much
    memory as the student weight gradient ``V_local * hidden * elem_bytes`` (at least 256 MiB,
    at most half of what is free on CUDA), so the loss's transient memory stays within twice
    the weight gradient. By default they get half each (``C_t = C``, a multiple of 128 that
    splits ``n_rows`` into nearly equal chunks). With ``teacher_quarter`` (the single-pass path:
    one process, no all-reduce per teacher sub-chunk) and more rows than half the buffers hold,
    ``C_t`` gets a quarter and ``C`` the rest in whole sub-chunks, and the chunks are exactly
    ``C`` rows with a shorter last one: on an H100 the 1024-row GEMMs of equal halves are slower
    than 1536-row student and 512-row teacher GEMMs in the same memory, and the weight gradient
    is accumulated fewer times (benchmarks/NOTES_loss_kernel.md, iteration 14).
    """
    if n_rows <= 0:
        return 1, 1
    if chunk_tokens is None:
        row_bytes = max(v_local * elem_bytes, 1)
        budget = max(v_local * hidden * elem_bytes, _MIN_BUFFER_BYTES)
        if device.type == "cuda":
            budget = min(budget, _free_bytes(device) // 2)
        both = max(budget // row_bytes // _ROW_ALIGN * _ROW_ALIGN, 2 * _ROW_ALIGN)
        half = both // 2 // _ROW_ALIGN * _ROW_ALIGN
        if not teacher_quarter or n_rows <= half:
            chunk = _balanced(n_rows, half, _ROW_ALIGN)
            return chunk, chunk
        teacher = max(both // 4 // _ROW_ALIGN * _ROW_ALIGN, _ROW_ALIGN)
        chunk = max((both - teacher) // teacher, 1) * teacher
        return min(chunk, n_rows), teacher
    chunk = _balanced(n_rows, chunk_tokens, 1)
    teacher_rows = chunk if teacher_chunk_tokens is None else teacher_chunk_tokens
    return chunk, min(teacher_rows, chunk)


def _reduce_stats_(stats: torch.Tensor, temperature: float, group: ProcessGroup) -> None:
    """Turn each rank's per-row (max, sum-exp) ``[5, 1, rows]`` into the global ones."""
    m_local = stats[:2].clone()
    all_reduce_max_(stats[:2], group)
    # maxima are raw logits; the sums are of 2^((z - m) log2(e) / tau)
    shift = torch.exp2((m_local - stats[:2]) * (ew.LOG2E / temperature))
    stats[2].mul_(shift[0])
    stats[3].mul_(shift[1])
    stats[4].mul_(shift[0])
    all_reduce_sum_(stats[2:], group)


def _loss_grad_(zs, zt, loss_out, cfg: _Config, grad_scale: float) -> None:
    """One teacher sub-chunk: loss partials into ``loss_out`` ``[P, rows]``, dz over ``zs``."""
    group, impl, tau = cfg.tp_group, cfg.impl, cfg.temperature
    tp = group_size(group) > 1
    split = loss_out.shape[0]
    reverse = cfg.kind == "reverse_kl"
    stats = ew.row_stats(zs, zt, tau, reverse, impl, split=split)
    if tp:
        stats = ew.combine_stats(stats, tau)
        _reduce_stats_(stats, tau, group)
    if cfg.kind in ("forward_kl", "reverse_kl"):
        ew.kl_loss_grad_(
            zs, zt, stats, loss_out, reverse=reverse, temperature=tau, grad_scale=grad_scale, impl=impl
        )
        return
    kl_s = ew.jsd_row_sums(zs, zt, stats, loss_out, beta=cfg.beta, temperature=tau, impl=impl)
    if tp:
        kl_s = all_reduce_sum_(kl_s.sum(dim=0, keepdim=True), group)
    ew.jsd_grad_(
        zs, zt, stats, kl_s, beta=cfg.beta, temperature=tau, grad_scale=grad_scale, impl=impl, split=split
    )


def uses_single_pass(impl: str, tp_size: int) -> bool:
    """Whether the fused loss runs the single-pass kernel (``ew.single_pass_loss_grad_``:
    statistics, loss and dz in one launch, no all-reduce between the passes) for element-wise
    ``impl`` over a TP group of ``tp_size``: Triton, one process holding whole vocabulary rows,
    and ``ew.KERNEL_CONFIG["single_pass"]`` on. It also decides the chunk plan (``plan_chunks``'s
    ``teacher_quarter``)."""
    return impl == "triton" and tp_size == 1 and bool(ew.KERNEL_CONFIG["single_pass"])


def _single_pass(cfg: _Config) -> bool:
    return uses_single_pass(cfg.impl, group_size(cfg.tp_group))


def _fused_forward(hs, ws, ht, wt, loss_mask, cfg: _Config, need_gh: bool, need_gw: bool,
                   weight_grad_into: torch.Tensor | None = None, weight_grad_scale: float = 1.0):
    """Loss (fp32 scalar) and the full gradients wrt ``hs`` / ``ws`` (None where not needed, or
    where the weight's went into ``weight_grad_into``: see ``OutputLayerGrads``)."""
    group = cfg.tp_group
    device = hs.device
    if cfg.sequence_parallel:
        hs = all_gather_dim0(hs, group)
        ht = all_gather_dim0(ht, group)
    idx, n = counted_tokens(loss_mask, hs.shape[0])
    grad_scale = 1.0 / max(n, 1) if cfg.reduction == "mean" else 1.0
    v_local = ws.shape[0]
    single = _single_pass(cfg)
    chunk, teacher_chunk = plan_chunks(
        n, v_local, ws.shape[1], ws.element_size(), device, cfg.chunk_tokens, cfg.teacher_chunk_tokens,
        teacher_quarter=single,
    )

    def student_logits(c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        # counted rows c0:c1's hidden states and their logits, in the student chunk buffer
        hs_c = rows(hs, idx, c0, c1)
        return hs_c, torch.mm(hs_c, ws.t(), out=buf_s[: c1 - c0])

    hs_c = zs = None
    if n > 0:
        # the first chunk's logits GEMM goes out before the rest of the set-up, so that a GPU
        # with nothing queued (a call at the start of a step) starts while the host prepares
        buf_s = torch.empty((chunk, v_local), dtype=ws.dtype, device=device)
        hs_c, zs = student_logits(0, min(chunk, n))
        buf_t = torch.empty((teacher_chunk, v_local), dtype=wt.dtype, device=device)
    grads = OutputLayerGrads(hs, ws, idx, n, need_gh, need_gw, cfg.fp32_weight_grad, weight_grad_into,
                             weight_grad_scale)
    # per-row loss partials, one per vocab segment of the element-wise kernels' grid
    if single:
        logits_dtype = ws.dtype if ws.dtype == wt.dtype else torch.float32  # the kernels' pair of buffers
        split = ew.single_pass_split(v_local, device, kind=cfg.kind, dtype=logits_dtype)
    else:
        split = ew.default_split(teacher_chunk, v_local, device) if cfg.impl == "triton" else 1
    loss_parts = torch.zeros((split, n), dtype=torch.float32, device=device)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        if c0 > 0:
            hs_c, zs = student_logits(c0, c1)
        for t0 in range(0, c1 - c0, teacher_chunk):
            t1 = min(t0 + teacher_chunk, c1 - c0)
            zt = buf_t[: t1 - t0]
            torch.mm(rows(ht, idx, c0 + t0, c0 + t1), wt.t(), out=zt)
            loss_out = loss_parts[:, c0 + t0 : c0 + t1]
            if single:
                kw = dict(kind=cfg.kind, beta=cfg.beta, temperature=cfg.temperature, impl=cfg.impl)
                ew.single_pass_loss_grad_(zs[t0:t1], zt, loss_out, grad_scale=grad_scale, **kw)
            else:
                _loss_grad_(zs[t0:t1], zt, loss_out, cfg, grad_scale)
        grads.add(zs, hs_c, c0, c1)  # zs now holds dL/dz

    loss = all_reduce_sum_(loss_parts.sum(), group) * grad_scale
    return (loss, *grads.finish(group, cfg.sequence_parallel))


class FusedLinearDistillFunction(torch.autograd.Function):
    """Autograd wrapper: the forward does all the work and keeps the gradients, the backward
    scales them by the incoming gradient. Teacher tensors are constants (no gradient).

    With ``weight_grad_into`` the weight's gradient is added there during the forward, already
    multiplied by ``weight_grad_scale``, the gradient the caller promises the loss will receive;
    the backward checks that promise and hands autograd no weight gradient."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, loss_mask, cfg,
                weight_grad_into=None, weight_grad_scale=1.0, grad_enabled=True):
        # needs_input_grad ignores grad mode: under no_grad (evaluation) no gradient is computed
        need_gh, need_gw = ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled
        ctx.promised_scale = weight_grad_scale if need_gw and weight_grad_into is not None else None
        loss, grad_h, grad_w = _fused_forward(
            student_hidden.detach(),
            student_weight.detach(),
            teacher_hidden.detach(),
            teacher_weight.detach(),
            loss_mask,
            cfg,
            need_gh,
            need_gw,
            weight_grad_into,
            weight_grad_scale,
        )
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_grads(ctx, grad_output, ctx.promised_scale), None, None, None, None, None, None, None)


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    tp_group: ProcessGroup = None,
    chunk_tokens: int | None = None,
    sequence_parallel: bool = False,
    reduction: str = "mean",
    impl: str | None = None,
    teacher_chunk_tokens: int | None = None,
    fp32_weight_grad: bool = False,
    weight_grad_into: torch.Tensor | None = None,
    weight_grad_scale: float = 1.0,
) -> torch.Tensor:
    """Distillation loss of the output layer's logits, computed chunk by chunk, never whole.

    Shapes (``T`` tokens; leading dims ``[...]`` are flattened, e.g. Megatron's ``[s, b]``):

    * ``student_hidden`` ``[..., h_s]``, ``teacher_hidden`` ``[..., h_t]``: the final hidden
      states; with ``sequence_parallel`` this rank's ``[T / tp, ...]`` block of the token dim
      (rank order), otherwise all ``T`` tokens (replicated over ``tp_group``).
    * ``student_weight`` ``[V_local, h_s]``, ``teacher_weight`` ``[V_local, h_t]``: this rank's
      vocab shard of each output layer (``V_local`` may differ between ranks).
    * ``loss_mask`` ``[...]`` over all ``T`` tokens (gathered order with sequence parallel);
      nonzero = counted (as 1: weights other than 0 / 1 are not supported). None counts all.

    Returns an fp32 scalar equal on every rank of ``tp_group`` to ``reference.distill_loss`` on
    the full-vocabulary logits (``reduction="mean"``: mean over unmasked tokens, 0 if none;
    ``"sum"``: their sum). Gradients flow to ``student_hidden`` (summed over the TP group, and
    reduce-scattered back to the local block with ``sequence_parallel``) and to
    ``student_weight`` (this shard's rows); the teacher tensors get none.

    ``kind`` / ``beta`` / ``temperature`` as in ``reference.distill_loss`` (no tau^2 factor).
    ``chunk_tokens`` / ``teacher_chunk_tokens`` override the automatic chunking
    (``plan_chunks``); ``impl`` ("triton" / "torch", or $MEGATRON_DISTILL_FUSED_IMPL) forces
    the element-wise implementation; ``fp32_weight_grad`` accumulates the weight gradient over
    chunks in fp32 (one extra ``[V_local, h_s]`` fp32 buffer) instead of the weight's dtype.

    ``weight_grad_into`` (``[V_local, h_s]``, fp32 or the weight's dtype; typically the
    parameter's Megatron ``main_grad``): when the weight needs a gradient, the forward adds
    ``weight_grad_scale * dloss/dW`` to it and the weight gets no autograd gradient, so no
    ``[V_local, h_s]`` gradient is held from the forward to the backward (Megatron's
    gradient-accumulation fusion, for this layer). ``weight_grad_scale`` must be the gradient
    the returned loss will receive in backward; the backward raises if it is not.
    """
    check_loss_args(kind, beta, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student ({hs.shape[0]}) and teacher ({ht.shape[0]}) token counts differ")
    if student_weight.shape[1] != hs.shape[1] or teacher_weight.shape[1] != ht.shape[1]:
        raise ValueError("each output-layer weight must be [V_local, hidden] of its hidden states")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student ({student_weight.shape[0]}) and teacher ({teacher_weight.shape[0]}) vocab shards differ"
        )
    if student_weight.dtype != hs.dtype or teacher_weight.dtype != ht.dtype:
        raise ValueError("each output-layer weight must have its hidden states' dtype")
    for name, value in (("chunk_tokens", chunk_tokens), ("teacher_chunk_tokens", teacher_chunk_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    cfg = _Config(
        kind=kind,
        beta=float(beta),
        temperature=float(temperature),
        tp_group=tp_group,
        chunk_tokens=chunk_tokens,
        teacher_chunk_tokens=teacher_chunk_tokens,
        sequence_parallel=sequence_parallel and group_size(tp_group) > 1,
        reduction=reduction,
        impl=resolve_impl(impl, hs.device),
        fp32_weight_grad=fp32_weight_grad,
    )
    loss = FusedLinearDistillFunction.apply(
        hs, student_weight, ht, teacher_weight, loss_mask, cfg, weight_grad_into, float(weight_grad_scale),
        torch.is_grad_enabled(),
    )
    return loss
