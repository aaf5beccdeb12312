"""Reference distillation losses against a top-k teacher (DESIGN.md, "Losses", top-k teacher).

The teacher is given only on ``K`` token ids per position: ``teacher_topk_ids [..., K]`` (global
vocabulary ids, distinct within a position) and ``teacher_topk_logprobs [..., K]``, log-probs
``a_k = log p_T(id_k)`` under the teacher's FULL softmax. The student's log-probs are its
log-softmax over the full vocabulary (all tensor-parallel shards), gathered at those ids:
``s_k = z_{id_k} / tau - logsumexp_v(z_v / tau)``. Per position, with ``^`` meaning
renormalized over the K ids (``x^_k = x_k - logsumexp_j x_j``, a log-softmax over K):

* ``forward_kl``: ``sum_k p_T(id_k) (a_k - s_k)``; the teacher mass outside the K ids is dropped.
  With ``renormalize=True`` the teacher is renormalized first: ``sum_k exp(a^_k) (a^_k - s_k)``.
  The student is not renormalized (its mass outside K still counts through ``s_k``).
* ``reverse_kl``: ``sum_k exp(s^_k) (s^_k - a^_k)``, both distributions renormalized over K.
* ``jsd`` (beta in [0, 1]): the dense formula on the two renormalized distributions,
  ``M = beta p^_T + (1 - beta) p^_S``; beta = 0 / 1 is the KL of the renormalized pair
  (``KL(p^_T || p^_S)`` / ``KL(p^_S || p^_T)``), as the dense ``jsd`` falls back to forward / reverse
  KL there. Note: ``jsd`` at beta = 0 therefore renormalizes the student too, unlike ``forward_kl``.

``renormalize`` only affects ``forward_kl``: the other kinds always renormalize both. With K = V
(every id, in any order) every variant equals ``reference.distill_loss`` exactly up to rounding.
For the renormalized student, ``s^`` does not depend on the full-vocabulary log-normalizer (it
cancels), so ``reverse_kl`` / ``jsd`` need only the student logits at the K ids, and their
gradient wrt the student logits is nonzero only there.

Temperature: ``temperature`` divides the student logits. The teacher log-probs are taken as
given: they must be those of ``softmax(z_T / tau)`` at the same tau. The teacher service applies
the temperature before its softmax and top-k (``RemoteTeacher.prefetch(..., temperature=tau)``),
which keeps ``forward_kl`` without renormalization exact; re-tempering top-k log-probs after the
fact could only be exact for the renormalized variants.

Tensor parallelism: each id lives on one shard. Its logit is gathered where owned, zero
elsewhere, and summed over the group with the identity-backward all-reduce; the student's
sum-exp is summed the same way. Every rank then computes the same (replicated) per-token loss
from replicated statistics, and backward on every rank gives that rank's shard its own gradient
(no factor tp: every collective here has the identity backward).
"""

from __future__ import annotations

import torch

from megatron_distill.losses.reference import _local_divergence_terms, check_loss_args, masked_token_mean
from megatron_distill.losses.tp_collectives import ProcessGroup, all_reduce_max_, all_reduce_sum_grad_identity


def vocab_parallel_gather(
    logits: torch.Tensor, ids: torch.Tensor, group: ProcessGroup, vocab_start: int
) -> torch.Tensor:
    """``logits`` of the full vocabulary at global ``ids``, from this rank's shard.

    ``logits`` ``[..., V_local]`` covers ids ``[vocab_start, vocab_start + V_local)``; ``ids``
    ``[..., K]`` int64 (any id of the full vocabulary). Returns ``[..., K]``, identical on every
    rank of ``group``; backward gives each rank the gradient of the ids it owns.
    """
    v_local = logits.shape[-1]
    local = ids.to(torch.int64) - vocab_start
    owned = (local >= 0) & (local < v_local)
    picked = logits.gather(-1, local.clamp(0, max(v_local - 1, 0)))
    return all_reduce_sum_grad_identity(torch.where(owned, picked, torch.zeros_like(picked)), group)


def vocab_parallel_logsumexp(logits: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``logsumexp`` over the full vocabulary of ``logits [..., V_local]``: ``[...]``, replicated.

    The sum-exp all-reduce has the identity backward: use it for a loss every rank computes whole.
    """
    with torch.no_grad():
        shift = all_reduce_max_(logits.detach().amax(dim=-1, keepdim=True), group)
    sum_exp = all_reduce_sum_grad_identity((logits - shift).exp().sum(dim=-1, keepdim=True), group)
    return (shift + sum_exp.log()).squeeze(-1)


def topk_divergence(
    student_scores: torch.Tensor, teacher_logprobs: torch.Tensor, kind: str, beta: float, renormalize: bool
) -> torch.Tensor:
    """Per-position top-k divergence from ``[..., K]`` student and teacher values: ``[...]``.

    ``student_scores``: the student's full-vocabulary log-probs at the ids (``forward_kl``); for
    ``reverse_kl`` / ``jsd`` any per-position shift of them (e.g. the tempered logits) will do,
    as the student is renormalized over K. ``teacher_logprobs``: the teacher's log-probs.
    """
    if kind == "forward_kl":
        teacher = torch.log_softmax(teacher_logprobs, dim=-1) if renormalize else teacher_logprobs
        return _local_divergence_terms(student_scores, teacher, "forward_kl", beta)
    student = torch.log_softmax(student_scores, dim=-1)
    teacher = torch.log_softmax(teacher_logprobs, dim=-1)
    return _local_divergence_terms(student, teacher, kind, beta)


def check_topk_args(student_lead: tuple[int, ...], ids: torch.Tensor, logprobs: torch.Tensor) -> None:
    """Raise ValueError unless ``ids`` / ``logprobs`` are ``[..., K]`` over the tokens ``[...]``."""
    if ids.shape != logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} differ in shape"
        )
    if tuple(ids.shape[:-1]) != tuple(student_lead) or ids.shape[-1] < 1:
        raise ValueError(f"teacher top-k tensors {tuple(ids.shape)} must be [*tokens, K >= 1] with tokens "
                         f"{tuple(student_lead)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise ValueError(f"teacher_topk_logprobs must be floating point, got {logprobs.dtype}")


def topk_distill_loss_per_token(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    renormalize: bool = False,
    tp_group: ProcessGroup = None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Per-token divergence between a top-k teacher and the student (module docstring).

    Args:
        student_logits: ``[..., V_local]``, this rank's vocabulary shard (ids
            ``[vocab_start, vocab_start + V_local)``; shards may differ in size across ranks).
        teacher_topk_ids: ``[..., K]`` int64 global ids, distinct per position, each held by
            exactly one rank of ``tp_group``.
        teacher_topk_logprobs: ``[..., K]`` finite teacher log-probs at temperature ``temperature``.
        kind, beta: as ``reference.distill_loss``.
        temperature: divides the student logits (the teacher's are already tempered).
        renormalize: renormalize the teacher over K for ``forward_kl`` (others always do).
        tp_group, vocab_start: the tensor-parallel group and this shard's first global id.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), identical on every rank of the group.
        Gradients flow to ``student_logits`` only.
    """
    check_loss_args(kind, beta, temperature)
    check_topk_args(tuple(student_logits.shape[:-1]), teacher_topk_ids, teacher_topk_logprobs)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(dtype) * (1.0 / temperature)
    picked = vocab_parallel_gather(z, teacher_topk_ids, tp_group, vocab_start)
    if kind == "forward_kl":
        picked = picked - vocab_parallel_logsumexp(z, tp_group).unsqueeze(-1)
    teacher = teacher_topk_logprobs.detach().to(dtype)
    return topk_divergence(picked, teacher, kind, float(beta), renormalize)


def topk_distill_loss(
    student_logits: torch.Tensor,
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
) -> torch.Tensor:
    """Mean over unmasked tokens of ``topk_distill_loss_per_token`` (same arguments).

    ``loss_mask`` ``[...]`` (nonzero = counted), None counts every token. Returns a float32
    scalar (float64 for float64 logits), 0 when every token is masked.
    """
    per_token = topk_distill_loss_per_token(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, kind, beta=beta, temperature=temperature,
        renormalize=renormalize, tp_group=tp_group, vocab_start=vocab_start,
    )
    return masked_token_mean(per_token, loss_mask)
