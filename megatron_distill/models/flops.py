"""Parameter and FLOP counts used for MFU (model FLOPs utilisation).

Formula (per token, bf16 dense matrix FLOPs; element-wise work not counted):
  N = parameters that take part in matrix products = transformer layers + output layer
      (the input embedding is a lookup and is excluded);
  attention scores and values add 2 x 2 x s x (heads x head_dim) FLOPs per layer forward,
      halved for the causal mask: 2 x s x heads x head_dim;
  forward = 2 N + attention; a trained model costs 3 x forward (forward + backward),
  i.e. 6 N + 3 x attention; a frozen teacher costs forward only, 2 N + attention.
"""

from __future__ import annotations

from megatron_distill.config import ModelShape


def head_dim(shape: ModelShape) -> int:
    """Per-head size (``kv_channels`` or hidden / heads)."""
    return shape.kv_channels or shape.hidden_size // shape.num_attention_heads


def matmul_parameters(shape: ModelShape) -> int:
    """Parameters used in matrix products per token: layers + output layer (no embedding)."""
    h, d = shape.hidden_size, head_dim(shape)
    q = shape.num_attention_heads * d
    kv = 2 * shape.num_query_groups * d
    attention = h * (q + kv) + q * h
    mlp = (2 if shape.swiglu else 1) * h * shape.ffn_hidden_size + shape.ffn_hidden_size * h
    return shape.num_layers * (attention + mlp) + shape.vocab_size * h


def forward_flops_per_token(shape: ModelShape, seq_length: int) -> float:
    """Forward FLOPs per token: 2 N + causal attention ``2 s heads head_dim`` per layer."""
    attention = 2 * seq_length * shape.num_attention_heads * head_dim(shape) * shape.num_layers
    return 2.0 * matmul_parameters(shape) + attention


def training_flops_per_token(shape: ModelShape, seq_length: int) -> float:
    """Forward + backward FLOPs per token: 3 x forward (6 N + 3 x attention)."""
    return 3.0 * forward_flops_per_token(shape, seq_length)
