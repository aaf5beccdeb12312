"""Megatron's MLP without keeping the activation's output for backward (``--recompute-modules swiglu``).

In a SwiGLU MLP the activation's output ``[tokens, ffn / TP]`` is saved by ``linear_fc2`` for its
weight gradient, beside ``linear_fc1``'s output ``[tokens, 2 ffn / TP]`` saved by the activation:
with the fused SwiGLU that is 48 of the ~80 KB a Llama-1B layer keeps per token. Here the
activation runs under Megatron's ``CheckpointWithoutOutput``: ``linear_fc2`` still saves the
tensor, but its storage is released after the forward and refilled from ``linear_fc1``'s output
when ``linear_fc2``'s backward is about to need it (one element-wise pass per layer), the way
Megatron recomputes MoE activations (``moe_act``). Gradients are unchanged bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.mlp import MLP


def fix_checkpoint_without_output_default() -> None:
    """Make ``CheckpointWithoutOutput()`` (no FP8 recipe given) mean no FP8, as intended.

    megatron-core 0.16.1 sets ``self.fp8 = fp8 is not None`` with a default of ``fp8=False``, so
    the no-argument form its transformer layer uses for the norm recompute takes the FP8 path,
    which needs Transformer Engine (NameError ``FP8GlobalStateManager`` without it). Patched only
    where that is the behaviour; idempotent.
    """
    cls = tensor_parallel.CheckpointWithoutOutput
    if getattr(cls, "_megatron_distill_fp8_fixed", False) or not cls().fp8:
        return
    original_init = cls.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = fp8 is not None and fp8 is not False

    cls.__init__ = __init__
    cls._megatron_distill_fp8_fixed = True


class ActivationRecomputeMLP(MLP):
    """``MLP`` whose SwiGLU output is recomputed in backward instead of stored.

    Supports the SwiGLU MLP (``gated_linear_unit`` with silu, fused or not, with or without the
    fc1 bias); anything else, and forward passes without grad, run Megatron's own forward.
    """

    def _supported(self, per_token_scale) -> bool:
        cfg = self.config
        return (torch.is_grad_enabled() and per_token_scale is None and cfg.gated_linear_unit
                and self.activation_func is F.silu and not cfg.use_te_activation_func
                and not getattr(cfg, "glu_linear_offset", 0.0)
                and getattr(cfg, "activation_func_clamp_value", None) is None)

    def _activation(self, fc1_out: torch.Tensor, fc1_bias: torch.Tensor | None) -> torch.Tensor:
        if self.config.bias_activation_fusion:
            return bias_swiglu_impl(fc1_out, fc1_bias)
        if fc1_bias is not None:
            fc1_out = fc1_out + fc1_bias
        gate, linear = torch.chunk(fc1_out, 2, dim=-1)
        return F.silu(gate) * linear

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        """``(output, output_bias)`` of the MLP for ``hidden_states`` ``[s, b, h]``, as Megatron's."""
        if not self._supported(per_token_scale):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_out, fc1_bias = self.linear_fc1(hidden_states)
        checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)  # fp8=None: no FP8 context
        activated = checkpoint.checkpoint(self._activation, fc1_out, fc1_bias)
        output, output_bias = self.linear_fc2(activated)
        # linear_fc2 has saved `activated`; free its storage, refill it when output's grad arrives.
        checkpoint.discard_output_and_register_recompute(output)
        return output, output_bias
