"""PyTorch LayerNorm / RMSNorm usable with sequence parallelism (Megatron's torch wrapper is not).

Megatron-Core's ``WrappedTorchNorm`` (used when apex is absent) refuses sequence parallelism
because its parameters lack the ``sequence_parallel`` mark that tells ``finalize_model_grads``
to sum their gradients over the TP group (each rank sees only its slice of the sequence).
This builder sets that mark; the math is the same torch module.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``RMSNorm`` over ``hidden_size`` per ``config.normalization``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm; use transformer_engine")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported (LayerNorm, RMSNorm)")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
