"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for Megatron-Core's ``DotProductAttention`` (the ``core_attention`` of the local layer
spec). Megatron's local version materialises the ``[b, heads, s, s]`` score matrix; SDPA picks
a fused kernel (FlashAttention-2 / memory-efficient on CUDA, the math kernel on the CPU), so
sequence 4096 needs no score matrix in memory and runs far faster without Transformer Engine.
Grouped-query attention is handled by SDPA itself (``enable_gqa``), without repeating K/V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Causal (or masked) multi-head attention on this TP rank's heads.

    Inputs ``query [sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` (``np`` and ``ng``
    per TP rank; ``sk >= sq``, larger with a KV cache); output ``[sq, b, np * hn]``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("context parallelism needs transformer_engine attention")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        """Attention output ``[sq, b, np * hn]``; ``attention_mask`` True marks masked pairs.

        ``sk`` may exceed ``sq`` with Megatron's KV cache (``inference_context``): an explicit
        ``attention_mask`` (broadcastable to ``[b, np, sq, sk]``) is used as given; without one,
        a causal mask aligns the ``sq`` queries with the last ``sq`` keys, and a decode step
        (``sq == 1``, or ``AttnMaskType.no_mask``, which Megatron passes once the cache holds
        the prompt) attends to every cached key.
        """
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences / attention bias need transformer_engine attention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, head_dim = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if torch.is_grad_enabled() and value.requires_grad:
            # Megatron's value is a view of linear_qkv's whole output (queries and keys included;
            # those went through RoPE into new tensors). Saved for backward as a view, it would keep
            # that whole [s, b, (np + 2 ng) hn] buffer alive; a copy keeps only [s, b, ng hn].
            v = v.contiguous()
        attn_mask = None
        is_causal = False
        sk = k.shape[2]
        if attention_mask is not None:
            attn_mask = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:  # queries are the last sq of sk positions (KV cache): bottom-right aligned
                attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=self.softmax_scale, enable_gqa=k.shape[1] != heads)
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
