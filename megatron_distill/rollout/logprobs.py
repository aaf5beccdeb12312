"""Per-token log-probabilities of given tokens under vocab-parallel logits.

``log p(t) = z_t - logsumexp_v z_v`` over the full vocabulary. Each TP rank holds ``z`` for its
shard; only per-token statistics cross the group (max, sum-exp, the picked log-prob), and no
``[b, s, V]`` log-softmax is materialised. Gradient convention (losses/reference.py): the
sum-exp all-reduce sums gradients over ranks; the picked value is a per-rank partial (nonzero
only on the rank that owns the token) summed with the identity-backward all-reduce, so the
gradient wrt ``z`` is ``onehot(t) - softmax(z)`` on every shard, as at TP=1.
"""

from __future__ import annotations

import math

import torch

from megatron_distill.losses.tp_collectives import (
    ProcessGroup,
    all_reduce_max_,
    all_reduce_sum_grad_identity,
    all_reduce_sum_grad_sum,
)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tp_group: ProcessGroup, vocab_start: int,
                   vocab_size: int | None = None) -> torch.Tensor:
    """``log softmax(logits)[tokens]`` over a vocabulary split across ``tp_group``.

    Args:
        logits: ``[b, s, V_local]`` (any leading shape), this rank's ids
            ``[vocab_start, vocab_start + V_local)``; differentiable.
        tokens: ``[b, s]`` global token ids (e.g. the next tokens: ``labels``).
        tp_group: the tensor-parallel group (None: one rank holds the whole vocabulary).
        vocab_start: first global id of this rank's shard.
        vocab_size: real vocabulary size; ids at or above it (TP padding rows) are left out of
            the softmax. None keeps every row.

    Returns:
        ``[b, s]`` float32 (float64 for float64 logits), identical on every rank of the group.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    v_local = z.shape[-1]
    if vocab_size is not None and vocab_start + v_local > vocab_size:
        ids = torch.arange(vocab_start, vocab_start + v_local, device=z.device)
        z = z.masked_fill(ids >= vocab_size, -math.inf)
    with torch.no_grad():
        shift = all_reduce_max_(z.detach().amax(dim=-1, keepdim=True), tp_group)
    sum_exp = all_reduce_sum_grad_sum((z - shift).exp().sum(dim=-1, keepdim=True), tp_group)
    lse = (shift + sum_exp.log()).squeeze(-1)
    local_ids = tokens.to(torch.int64) - vocab_start
    owned = (local_ids >= 0) & (local_ids < v_local)
    picked = z.gather(-1, local_ids.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    partial = torch.where(owned, picked - lse, torch.zeros_like(picked))
    return all_reduce_sum_grad_identity(partial, tp_group)
