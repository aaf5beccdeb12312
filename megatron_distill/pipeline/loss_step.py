"""The last stage's loss: distillation term + optional cross-entropy, as token *sums*.

Megatron's schedule is run with ``calculate_per_token_loss``: each micro-batch returns the sum
of its per-token losses and its token count, and ``finalize_model_grads`` divides the gradients
by the token count of the whole global batch (all micro-batches, all DP ranks). The loss is thus
normalised the same way whatever TP / PP / DP / micro-batching is used.

On-policy batches (``onpolicy.py``) carry a per-sample ``on_policy`` flag and ``advantages``.
Then the stats hold three more sums: the distillation sum and the token count of the on-policy
samples (for separate on/off-policy metrics) and the policy-gradient sum
``-sum_{i,t} A_i log pi(y_t)`` over the student-generated response tokens, weighted by
``RLTerm.weight`` into the loss. Stats slots: 0 kd, 1 ce, 2 tokens, 3 kd on-policy, 4 tokens
on-policy, 5 pg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_distill.config import LossConfig
from megatron_distill.losses.reference import distill_loss_per_token, vocab_parallel_log_softmax
from megatron_distill.losses.tp_collectives import ProcessGroup, all_reduce_sum_grad_identity
from megatron_distill.rollout.logprobs import token_logprobs
from megatron_distill.rollout.rl import policy_gradient_loss_sum


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group: ProcessGroup,
                                 vocab_start: int) -> torch.Tensor:
    """Per-token cross-entropy ``-log softmax(logits)[label]`` over a vocab split across TP.

    ``logits`` ``[..., V_local]`` covering ids ``[vocab_start, vocab_start + V_local)``,
    ``labels`` ``[...]``. Returns ``[...]`` float32, identical on every TP rank.
    """
    logp = vocab_parallel_log_softmax(logits.float(), tp_group)
    local_ids = labels - vocab_start
    in_shard = (local_ids >= 0) & (local_ids < logits.shape[-1])
    picked = torch.gather(logp, -1, local_ids.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    return -all_reduce_sum_grad_identity(picked, tp_group)


@dataclass
class RLTerm:
    """The policy-gradient term of a micro-batch: per-sample ``advantages`` [b] and ``on_policy`` [b] flags.

    ``temperature``: the student's log-probs are those of ``softmax(z / temperature)``, the
    distribution the rollouts were sampled from (1 for greedy rollouts).
    """

    advantages: torch.Tensor
    weight: float
    temperature: float = 1.0


def _split_stats(stats: list[torch.Tensor], on_policy: torch.Tensor | None, kd_on: torch.Tensor,
                 tokens_on: torch.Tensor, pg_sum: torch.Tensor) -> torch.Tensor:
    """The stats vector: 3 slots offline, 6 with an ``on_policy`` flag (module docstring)."""
    if on_policy is not None:
        stats = stats + [kd_on.detach().float(), tokens_on.detach().float(), pg_sum.detach().float()]
    return torch.stack(stats)


@dataclass
class VocabShard:
    """Which real vocabulary ids this TP rank's output rows hold (padding rows excluded)."""

    start: int
    valid: int

    @classmethod
    def for_rank(cls, vocab_size: int, padded_vocab_size: int, tp_rank: int, tp_size: int) -> VocabShard:
        per_rank = padded_vocab_size // tp_size
        start = tp_rank * per_rank
        return cls(start=start, valid=max(0, min(per_rank, vocab_size - start)))


def distill_loss_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_cfg: LossConfig,
    shard: VocabShard,
    tp_group: ProcessGroup,
    on_policy: torch.Tensor | None = None,
    rl: RLTerm | None = None,
):
    """Weighted loss sum over unmasked tokens of one micro-batch, and what to log.

    ``student_logits``/``teacher_logits`` ``[b, s, V_local]`` (padding rows are dropped here so
    the divergence is over the real vocabulary), ``labels`` and ``loss_mask`` ``[b, s]``.
    ``on_policy`` ``[b]`` (1 for student-generated samples) and ``rl`` (the policy-gradient term
    on those samples' response tokens) come with on-policy batches.
    Returns ``(loss_sum, num_tokens, {"sums": [kd, ce, tokens(, kd_on, tokens_on, pg)]})``.
    """
    mask = loss_mask.float()
    num_tokens = mask.sum()
    s_logits = student_logits[..., : shard.valid]
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    kd_sum = torch.zeros_like(total)
    ce_sum = torch.zeros_like(total)
    kd_on, pg_sum = torch.zeros_like(total), torch.zeros_like(total)
    on_mask = None if on_policy is None else mask * on_policy.to(mask.dtype).unsqueeze(1)
    if loss_cfg.kd_weight > 0:
        assert teacher_logits is not None, "a distillation loss needs a teacher"
        per_token = distill_loss_per_token(
            s_logits,
            teacher_logits[..., : shard.valid],
            loss_cfg.kind,
            beta=loss_cfg.beta,
            temperature=loss_cfg.temperature,
            tp_group=tp_group,
        )
        kd_sum = (per_token * mask).sum()
        total = total + loss_cfg.kd_weight * kd_sum
        if on_mask is not None:
            kd_on = (per_token.detach() * on_mask).sum()
    if loss_cfg.ce_weight > 0:
        per_token_ce = vocab_parallel_cross_entropy(s_logits, labels, tp_group, shard.start)
        ce_sum = (per_token_ce * mask).sum()
        total = total + loss_cfg.ce_weight * ce_sum
    if rl is not None and rl.weight > 0:
        assert on_mask is not None, "the policy-gradient term needs the on_policy flags"
        logprobs = token_logprobs(s_logits / rl.temperature, labels, tp_group, shard.start)
        pg_sum = policy_gradient_loss_sum(logprobs, rl.advantages, on_mask)
        total = total + rl.weight * pg_sum
    tokens_on = on_mask.sum() if on_mask is not None else None
    stats = _split_stats([kd_sum.detach(), ce_sum.detach(), num_tokens.detach()], on_policy, kd_on, tokens_on, pg_sum)
    return total, num_tokens.to(torch.int), {"sums": stats}


def fused_distill_loss_sums(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_cfg: LossConfig,
    shard: VocabShard,
    tp_group: ProcessGroup,
    sequence_parallel: bool,
    on_policy: torch.Tensor | None = None,
    loss_scale: float | None = None,
):
    """Like ``distill_loss_sums`` but from hidden states, through the fused output-layer + loss.

    ``student_hidden`` ``[s, b, h_s]`` and ``teacher_hidden`` ``[s, b, h_t]`` (``s / tp`` rows
    with sequence parallelism), output weights ``[V_local, h]`` (this rank's vocab shard),
    ``loss_mask`` ``[b, s]``. Logits are never materialised beyond one token chunk.
    With ``on_policy`` ``[b]`` the on-policy part is summed apart: free when the micro-batch is all
    on- or all off-policy, two kernel calls (one per part, same total) when it mixes both.
    With ``loss_scale`` (the factor the schedule multiplies the returned loss by before backward)
    and a ``student_weight`` that has Megatron's ``main_grad``, the weight's gradient goes straight
    into ``main_grad`` (``fused_linear_distill_loss``'s ``weight_grad_into``).
    """
    from megatron_distill.losses.fused import fused_linear_distill_loss

    main_grad = getattr(student_weight, "main_grad", None) if loss_scale is not None else None
    into = None if main_grad is None else main_grad[: shard.valid]

    def kd(token_mask: torch.Tensor) -> torch.Tensor:
        # Tokens are flattened sequence-major, matching Megatron's [s, b, h] (and SP's s-split).
        return fused_linear_distill_loss(
            student_hidden.reshape(-1, student_hidden.shape[-1]),
            student_weight[: shard.valid],
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight[: shard.valid],
            loss_cfg.kind,
            beta=loss_cfg.beta,
            temperature=loss_cfg.temperature,
            loss_mask=token_mask.transpose(0, 1).reshape(-1),
            tp_group=tp_group,
            sequence_parallel=sequence_parallel,
            reduction="sum",
            chunk_tokens=loss_cfg.chunk_tokens,
            weight_grad_into=into,
            # d total / d kd_sum: the schedule's loss scale times the distillation weight
            weight_grad_scale=1.0 if loss_scale is None else loss_scale * loss_cfg.kd_weight,
        )

    mask = loss_mask.float()
    num_tokens = mask.sum()
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    kd_on, tokens_on = zero, None
    if on_policy is None or bool(on_policy.min() == on_policy.max()):
        kd_sum = kd(mask)
        if on_policy is not None:
            all_on = bool(on_policy[0] > 0)
            kd_on, tokens_on = (kd_sum, num_tokens) if all_on else (zero, zero)
    else:
        on_mask = mask * on_policy.to(mask.dtype).unsqueeze(1)
        kd_on, tokens_on = kd(on_mask), on_mask.sum()
        kd_sum = kd_on + kd(mask - on_mask)
    total = loss_cfg.kd_weight * kd_sum
    stats = _split_stats([kd_sum.detach().float(), zero, num_tokens.detach()], on_policy, kd_on, tokens_on, zero)
    return total, num_tokens.to(torch.int), {"sums": stats}


def topk_distill_loss_sums(
    student_out: torch.Tensor,
    batch: dict,
    loss_cfg: LossConfig,
    shard: VocabShard,
    tp_group: ProcessGroup,
    student_weight: torch.Tensor | None = None,
    sequence_parallel: bool = False,
):
    """Distillation sums against a top-k teacher (``batch["teacher_topk_ids"/"teacher_topk_logprobs"]``, [b, s, K]).

    ``student_out`` is the student's logits ``[b, s, V_local]`` (reference path), or with
    ``student_weight`` its hidden states ``[s, b, h]`` for the fused top-k kernel. Same return
    value as ``distill_loss_sums``.
    """
    from megatron_distill.losses.fused_topk import fused_linear_topk_distill_loss
    from megatron_distill.losses.topk import topk_distill_loss_per_token

    ids, logprobs = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]
    kwargs = dict(beta=loss_cfg.beta, temperature=loss_cfg.temperature, renormalize=loss_cfg.topk_renormalize,
                  tp_group=tp_group, vocab_start=shard.start)
    if student_weight is None:
        mask = batch["loss_mask"].float()
        per_token = topk_distill_loss_per_token(student_out[..., : shard.valid], ids, logprobs, loss_cfg.kind,
                                                **kwargs)
        kd_sum = (per_token * mask).sum()
    else:
        mask = batch["loss_mask"].transpose(0, 1).reshape(-1).float()
        k = ids.shape[-1]
        kd_sum = fused_linear_topk_distill_loss(
            student_out.reshape(-1, student_out.shape[-1]), student_weight[: shard.valid],
            ids.transpose(0, 1).reshape(-1, k), logprobs.transpose(0, 1).reshape(-1, k), loss_cfg.kind,
            loss_mask=mask, sequence_parallel=sequence_parallel, reduction="sum", chunk_tokens=loss_cfg.chunk_tokens,
            **kwargs,
        )
    num_tokens = mask.sum()
    zero = torch.zeros((), dtype=torch.float32, device=kd_sum.device)
    stats = torch.stack([kd_sum.detach().float(), zero, num_tokens.detach()])
    return loss_cfg.kd_weight * kd_sum, num_tokens.to(torch.int), {"sums": stats}
