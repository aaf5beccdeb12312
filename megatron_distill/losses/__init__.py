"""Distillation losses on vocab-parallel logits (reference) and fused output-layer + loss."""

from megatron_distill.losses.fused import fused_linear_distill_loss
from megatron_distill.losses.fused_topk import fused_linear_topk_distill_loss
from megatron_distill.losses.reference import (
    LOSS_KINDS,
    distill_loss,
    distill_loss_per_token,
    vocab_parallel_log_softmax,
)
from megatron_distill.losses.topk import topk_distill_loss, topk_distill_loss_per_token

__all__ = [
    "LOSS_KINDS",
    "distill_loss",
    "distill_loss_per_token",
    "fused_linear_distill_loss",
    "fused_linear_topk_distill_loss",
    "topk_distill_loss",
    "topk_distill_loss_per_token",
    "vocab_parallel_log_softmax",
]
