"""Fused vocab-parallel output layer + top-k-teacher distillation loss.

``fused_linear_topk_distill_loss`` returns what ``topk.topk_distill_loss`` returns on the logits
``student_hidden @ student_weight.T`` (and its gradients wrt ``student_hidden`` /
``student_weight``) while holding logits for one token chunk only, with the chunking, masking,
sequence-parallel layout and gradient handling of ``fused.fused_linear_distill_loss``. The
element-wise part is plain PyTorch (there is no teacher logits buffer: the teacher is ``[C, K]``).

Per chunk of ``C`` unmasked tokens, with ``u = z_S / tau`` (fp32) on this rank's shard:

1. ``z_S = h_S W_S^T`` into a ``[C, V_local]`` buffer;
2. ``g_k = u[id_k]`` gathered where owned (zero elsewhere) and, for ``forward_kl``, the row max
   then sum-exp: one all-reduce (max) and one all-reduce (sum) of ``[C, 1 + K]`` over TP, after
   which every rank holds ``g [C, K]`` and ``lse [C]``. ``reverse_kl`` / ``jsd`` need only ``g``
   (one all-reduce of ``[C, K]``) and never touch the rest of the chunk except to zero it;
3. the per-row loss and ``dL/dg`` in closed form (replicated on every rank), then
   ``dz = (c * softmax(u) + scatter(dL/dg)) / tau`` over this shard, written over ``z_S``:

   * ``forward_kl``, teacher weights ``w_k = p_T(id_k)`` (renormalized over K with
     ``renormalize``): ``L = sum_k w_k (a_k - g_k + lse)``, ``dL/dg = -w``, ``c = sum_k w_k``
     (``= 1`` when renormalized);
   * renormalized student ``q = softmax_K(g)``, ``s^ = log q``, teacher ``a^ = log_softmax_K(a)``,
     ``p^ = exp(a^)``; ``c = 0`` (the full-vocabulary normalizer cancels), and with
     ``d_k = dL/d s^_k`` up to a constant, ``dL/dg = q (d - sum_k q_k d_k)``:
     ``reverse_kl``: ``L = sum q (s^ - a^)``, ``d = s^ - a^``;
     ``jsd``: ``log m = logaddexp(log beta + a^, log(1 - beta) + s^)``,
     ``L = beta sum p^ (a^ - log m) + (1 - beta) sum q (s^ - log m)``, ``d = (1 - beta)(s^ - log m)``;
     ``jsd`` at beta = 0: ``L = sum p^ (a^ - s^)``, ``dL/dg = q - p^``; beta = 1 is ``reverse_kl``;
4. ``grad_h[rows] = dz W_S`` and ``grad_W += dz^T h_S`` (as in fused.py).

The loss is replicated on every rank (no all-reduce of it); ``grad_h`` is all-reduced over TP
(reduce-scattered with sequence parallel), as each rank holds dz for its shard only.

Memory: one ``[C, V_local]`` logits buffer per chunk (``plan_chunks``, no teacher buffer), plus
for bf16 ``forward_kl`` an fp32 working copy of it (1.5x the dense fused path's two buffers).
The gradient GEMMs stay dense even where dz is sparse (``reverse_kl`` / ``jsd``: nonzero only at
the K ids); a sparse ``grad_h = sum_k dz_k W[id_k]`` would need ``[C, K, h]`` gathered rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_distill.losses.fused import REDUCTIONS, plan_chunks
from megatron_distill.losses.output_layer_grads import OutputLayerGrads, counted_tokens, rows, scale_saved_grads
from megatron_distill.losses.reference import check_loss_args
from megatron_distill.losses.topk import check_topk_args
from megatron_distill.losses.tp_collectives import (
    ProcessGroup,
    all_gather_dim0,
    all_reduce_max_,
    all_reduce_sum_,
    group_size,
)


@dataclass(frozen=True)
class _TopkConfig:
    kind: str  # forward_kl, reverse_kl, jsd, or forward_kl_hat (jsd at beta = 0)
    beta: float
    temperature: float
    renormalize: bool
    tp_group: ProcessGroup
    vocab_start: int
    chunk_tokens: int | None
    sequence_parallel: bool
    reduction: str
    fp32_weight_grad: bool


def topk_loss_and_grad(g: torch.Tensor, a: torch.Tensor, lse: torch.Tensor | None, kind: str, beta: float,
                       renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Closed-form per-row loss ``[C]``, ``dL/dg`` ``[C, K]`` and softmax coefficient ``c`` ``[C]``.

    ``g`` ``[C, K]``: tempered student logits at the ids; ``a`` ``[C, K]``: teacher log-probs;
    ``lse`` ``[C]``: full-vocabulary logsumexp of the tempered student logits (``forward_kl``
    only, else None). ``kind`` may be ``forward_kl_hat`` (jsd at beta = 0). ``c`` is None when
    the full-vocabulary softmax term vanishes (renormalized student).
    """
    if kind == "forward_kl":
        if renormalize:
            a = torch.log_softmax(a, dim=-1)
        w = a.exp()
        loss = (w * (a - g + lse.unsqueeze(-1))).sum(-1)
        return loss, -w, w.sum(-1)
    s_hat = torch.log_softmax(g, dim=-1)
    a_hat = torch.log_softmax(a, dim=-1)
    q = s_hat.exp()
    if kind == "forward_kl_hat":
        p = a_hat.exp()
        return (p * (a_hat - s_hat)).sum(-1), q - p, None
    if kind == "reverse_kl":
        d = s_hat - a_hat
        loss = (q * d).sum(-1)
    else:
        log_m = torch.logaddexp(a_hat + math.log(beta), s_hat + math.log1p(-beta))
        kl_t = (a_hat.exp() * (a_hat - log_m)).sum(-1)
        kl_s = (q * (s_hat - log_m)).sum(-1)
        loss = beta * kl_t + (1.0 - beta) * kl_s
        d = (1.0 - beta) * (s_hat - log_m)
    return loss, q * (d - (q * d).sum(-1, keepdim=True)), None


def _chunk_loss_grad_(zs: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, cfg: _TopkConfig,
                      grad_scale: float) -> torch.Tensor:
    """Loss per row ``[C]`` (replicated over TP); dz (times ``grad_scale``) written over ``zs``."""
    group, inv_tau = cfg.tp_group, 1.0 / cfg.temperature
    dtype = torch.promote_types(zs.dtype, torch.float32)
    v_local = zs.shape[1]
    local = ids - cfg.vocab_start
    owned = (local >= 0) & (local < v_local)
    local = local.clamp(0, max(v_local - 1, 0))
    scale = grad_scale * inv_tau
    if cfg.kind != "forward_kl":
        # renormalized student: only the logits at the ids matter, and dz is zero elsewhere
        g = all_reduce_sum_(torch.where(owned, zs.gather(1, local).to(dtype) * inv_tau, 0.0), group)
        loss, dg, _ = topk_loss_and_grad(g, a.to(dtype), None, cfg.kind, cfg.beta, False)
        zs.zero_()
        # scatter_add_: a non-owned id adds 0 at its clamped index, never overwrites an owned one
        zs.scatter_add_(1, local, torch.where(owned, dg * scale, 0.0).to(zs.dtype))
        return loss
    # in place over fp32 logits; a fresh fp32 working copy of bf16 ones
    u = zs.mul_(inv_tau) if zs.dtype == dtype else zs.to(dtype).mul_(inv_tau)
    picked = torch.where(owned, u.gather(1, local), 0.0)
    shift = all_reduce_max_(u.amax(dim=1, keepdim=True), group)
    u.sub_(shift).exp_()
    sums = torch.cat([u.sum(dim=1, keepdim=True), picked], dim=1)  # [C, 1 + K]: one all-reduce
    all_reduce_sum_(sums, group)
    lse = shift.squeeze(1) + sums[:, 0].log()
    loss, dg, coef = topk_loss_and_grad(sums[:, 1:], a.to(dtype), lse, "forward_kl", cfg.beta, cfg.renormalize)
    u.mul_((coef * scale / sums[:, 0]).unsqueeze(1))  # c * softmax(z / tau) * scale
    u.scatter_add_(1, local, torch.where(owned, dg * scale, 0.0))
    if u.data_ptr() != zs.data_ptr():
        zs.copy_(u)
    return loss


def _fused_topk_forward(hs, ws, ids, logp, loss_mask, cfg: _TopkConfig, need_gh: bool, need_gw: bool):
    """Loss (fp32 scalar) and the full gradients wrt ``hs`` / ``ws`` (None where not needed)."""
    group, device = cfg.tp_group, hs.device
    if cfg.sequence_parallel:
        hs = all_gather_dim0(hs, group)
    if ids.shape[0] != hs.shape[0]:
        raise ValueError(f"the teacher top-k tensors have {ids.shape[0]} tokens, the hidden states {hs.shape[0]}")
    idx, n = counted_tokens(loss_mask, hs.shape[0])
    grad_scale = 1.0 / max(n, 1) if cfg.reduction == "mean" else 1.0
    grads = OutputLayerGrads(hs, ws, idx, n, need_gh, need_gw, cfg.fp32_weight_grad)
    chunk, _ = plan_chunks(n, ws.shape[0], ws.shape[1], ws.element_size(), device, cfg.chunk_tokens)
    loss_rows = torch.zeros(n, dtype=torch.promote_types(hs.dtype, torch.float32), device=device)
    buf_s = torch.empty((chunk, ws.shape[0]), dtype=ws.dtype, device=device) if n > 0 else None
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        hs_c = rows(hs, idx, c0, c1)
        zs = buf_s[: c1 - c0]
        torch.mm(hs_c, ws.t(), out=zs)
        loss_rows[c0:c1] = _chunk_loss_grad_(zs, rows(ids, idx, c0, c1), rows(logp, idx, c0, c1), cfg, grad_scale)
        grads.add(zs, hs_c, c0, c1)  # zs now holds dL/dz
    loss = (loss_rows.sum() * grad_scale).float()
    return (loss, *grads.finish(group, cfg.sequence_parallel))


class FusedLinearTopkDistillFunction(torch.autograd.Function):
    """The forward does all the work and keeps the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, ids, logp, loss_mask, cfg, grad_enabled=True):
        # needs_input_grad ignores grad mode: under no_grad (evaluation) no gradient is computed
        loss, grad_h, grad_w = _fused_topk_forward(
            student_hidden.detach(), student_weight.detach(), ids, logp.detach(), loss_mask, cfg,
            ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled,
        )
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_grads(ctx, grad_output), None, None, None, None, None)


def fused_linear_topk_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    renormalize: bool = False,
    loss_mask: torch.Tensor | None = None,
    tp_group: ProcessGroup = None,
    vocab_start: int = 0,
    sequence_parallel: bool = False,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    fp32_weight_grad: bool = False,
) -> torch.Tensor:
    """Top-k-teacher distillation loss of the output layer's logits, chunk by chunk, never whole.

    Shapes (``T`` tokens; leading dims ``[...]`` are flattened, e.g. Megatron's ``[s, b]``):

    * ``student_hidden`` ``[..., h]``: with ``sequence_parallel`` this rank's ``[T / tp, ...]``
      block of the tokens (rank order), otherwise all ``T`` tokens (replicated over TP).
    * ``student_weight`` ``[V_local, h]``: this rank's vocab shard, global ids
      ``[vocab_start, vocab_start + V_local)``.
    * ``teacher_topk_ids`` ``[..., K]`` int64 and ``teacher_topk_logprobs`` ``[..., K]`` over all
      ``T`` tokens (gathered order with sequence parallel), replicated over TP; see
      ``topk.topk_distill_loss_per_token`` for their meaning and the temperature convention.
    * ``loss_mask`` ``[...]`` over all ``T`` tokens; nonzero = counted. None counts all.

    Returns an fp32 scalar, equal on every rank to ``topk.topk_distill_loss`` on the
    full-vocabulary logits (``reduction="mean"``: mean over unmasked tokens, 0 if none;
    ``"sum"``: their sum). Gradients flow to ``student_hidden`` (summed over TP, reduce-scattered
    with ``sequence_parallel``) and ``student_weight``; the teacher tensors get none.
    ``chunk_tokens`` overrides the automatic chunking; ``fp32_weight_grad`` accumulates the
    weight gradient in fp32.
    """
    check_loss_args(kind, beta, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    if student_weight.shape[1] != hs.shape[1] or student_weight.dtype != hs.dtype:
        raise ValueError("student_weight must be [V_local, hidden] with the hidden states' dtype")
    if teacher_topk_ids.dim() < 1:
        raise ValueError("teacher_topk_ids must be [..., K]")
    # token counts are checked against the (gathered) hidden states in the forward
    check_topk_args(tuple(teacher_topk_ids.shape[:-1]), teacher_topk_ids, teacher_topk_logprobs)
    k = teacher_topk_ids.shape[-1]
    ids, logp = teacher_topk_ids.reshape(-1, k), teacher_topk_logprobs.reshape(-1, k)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl_hat" if beta == 0.0 else "reverse_kl"
    cfg = _TopkConfig(
        kind=kind, beta=float(beta), temperature=float(temperature), renormalize=bool(renormalize),
        tp_group=tp_group, vocab_start=int(vocab_start), chunk_tokens=chunk_tokens,
        sequence_parallel=sequence_parallel and group_size(tp_group) > 1, reduction=reduction,
        fp32_weight_grad=fp32_weight_grad,
    )
    return FusedLinearTopkDistillFunction.apply(
        hs, student_weight, ids.to(torch.int64), logp, loss_mask, cfg, torch.is_grad_enabled()
    )
