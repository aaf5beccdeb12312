"""Reference distillation losses on vocab-parallel logits: the contract every fast path must meet.

Definitions (DESIGN.md, "Losses"), with p_T = softmax(z_T / tau) and p_S = softmax(z_S / tau)
over the FULL vocabulary (all tensor-parallel shards):

* ``forward_kl`` = KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)
* ``reverse_kl`` = KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
* ``jsd`` (beta in [0, 1], TRL/GKD convention): M = beta p_T + (1 - beta) p_S,
  JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M); beta = 0 is exactly ``forward_kl``
  and beta = 1 exactly ``reverse_kl``, as TRL's ``generalized_jsd_loss`` does.

No tau^2 factor is applied. Each rank holds logits for its own slice of the vocabulary; only
per-token statistics (max, sum-exp, the per-token loss) cross the tensor-parallel group, so
the full vocabulary is never gathered.

Gradient convention across ranks: the total loss is L = sum_r l_r(z_r, g), where g (the log
normaliser) depends on every rank's logits through an all-reduced sum-exp. The backward of the
sum-exp all-reduce must therefore sum the gradients over ranks (each rank's l_r depends on g),
while the final per-token loss, replicated on every rank, takes an identity backward.
"""

from __future__ import annotations

import math

import torch

from megatron_distill.losses.tp_collectives import (
    ProcessGroup,
    all_reduce_max_,
    all_reduce_sum_,
    all_reduce_sum_grad_identity,
    all_reduce_sum_grad_sum,
)

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd")


def vocab_parallel_log_softmax(logits: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """log-softmax over a vocabulary split across ``group``; ``logits`` is ``[..., V_local]``.

    Returns ``[..., V_local]`` log-probabilities under the full-vocabulary softmax. Autograd
    flows through when ``logits`` requires grad.
    """
    with torch.no_grad():
        shift = all_reduce_max_(logits.detach().amax(dim=-1, keepdim=True), group)
    shifted = logits - shift
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    if logits.requires_grad:
        sum_exp = all_reduce_sum_grad_sum(sum_exp, group)
    else:
        sum_exp = all_reduce_sum_(sum_exp, group)
    return shifted - sum_exp.log()


def _local_divergence_terms(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float
) -> torch.Tensor:
    """Per-token sum over this rank's vocab slice of the divergence integrand: ``[...]``."""
    p_t = teacher_logp.exp()
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return (p_t * (teacher_logp - student_logp)).sum(dim=-1)
    p_s = student_logp.exp()
    if kind == "reverse_kl":
        return (p_s * (student_logp - teacher_logp)).sum(dim=-1)
    # jsd: log M = logsumexp(log beta + log p_T, log(1 - beta) + log p_S), element-wise.
    log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    kl_teacher_m = p_t * (teacher_logp - log_m)
    kl_student_m = p_s * (student_logp - log_m)
    return (beta * kl_teacher_m + (1.0 - beta) * kl_student_m).sum(dim=-1)


def check_loss_args(kind: str, beta: float, temperature: float) -> None:
    """Raise ValueError naming the bad argument (loss kind, beta or temperature)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"kd loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def distill_loss_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tp_group: ProcessGroup = None,
) -> torch.Tensor:
    """Per-token divergence between tempered teacher and student distributions.

    ``student_logits`` and ``teacher_logits`` are ``[..., V_local]``: this rank's shard of the
    vocabulary over ``tp_group`` (shards may differ in size across ranks). Returns ``[...]`` in
    float32 (float64 when either input is float64), the divergence summed over the whole
    vocabulary, identical on every rank of the group. Gradients flow to ``student_logits`` only.
    """
    check_loss_args(kind, beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    inv_tau = 1.0 / temperature
    # At least float32 (bf16/fp16 logits are upcast); float64 inputs stay float64.
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    student_logp = vocab_parallel_log_softmax(student_logits.to(dtype) * inv_tau, tp_group)
    with torch.no_grad():
        teacher_logp = vocab_parallel_log_softmax(teacher_logits.detach().to(dtype) * inv_tau, tp_group)
    local = _local_divergence_terms(student_logp, teacher_logp, kind, beta)
    return all_reduce_sum_grad_identity(local, tp_group)


def masked_token_mean(per_token: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_token`` ``[...]`` over tokens whose ``loss_mask`` ``[...]`` is nonzero (None: all).

    0 when every token is masked; raises ValueError when the mask's shape differs.
    """
    if loss_mask is None:
        return per_token.mean()
    mask = loss_mask.to(per_token.dtype)
    if mask.shape != per_token.shape:
        raise ValueError(f"loss_mask {tuple(mask.shape)} must match the token shape {tuple(per_token.shape)}")
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    tp_group: ProcessGroup = None,
) -> torch.Tensor:
    """Mean over unmasked tokens of the per-token divergence (see ``distill_loss_per_token``).

    ``loss_mask`` has the logits' leading shape ``[...]`` (nonzero = counted); None counts every
    token. Returns a float32 scalar (float64 for float64 logits); 0 when every token is masked.
    """
    per_token = distill_loss_per_token(
        student_logits, teacher_logits, kind, beta=beta, temperature=temperature, tp_group=tp_group
    )
    return masked_token_mean(per_token, loss_mask)
