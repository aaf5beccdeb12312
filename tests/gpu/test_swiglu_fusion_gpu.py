"""Megatron's fused SwiGLU (what --bias-swiglu-fusion turns on, CUDA only) on this GPU stack.

Reference: the unfused ops the local layer spec runs otherwise, ``silu(a) * b`` on the two
halves of the FFN input, in float64. bf16 input; the fused kernel computes in fp32 inside and
rounds once, the unfused ops round silu's output to bf16 first, so the fused result is at least
as close to float64 (bound: 2^-8 relative, one bf16 rounding, norm-wise).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fused_swiglu_forward_and_backward_match_float64():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 512, 2 * 1024, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(2, 512, 1024, device="cuda", generator=g).to(torch.bfloat16)

    fused = bias_swiglu_impl(x, None)
    (fused_grad,) = torch.autograd.grad(fused, x, grad_out)

    x64 = x.detach().double().requires_grad_()
    a, b = torch.chunk(x64, 2, dim=-1)
    ref = torch.nn.functional.silu(a) * b
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out.double())

    a16, b16 = torch.chunk(x.detach(), 2, dim=-1)
    unfused = torch.nn.functional.silu(a16) * b16
    assert fused.dtype == torch.bfloat16 and fused.shape == unfused.shape
    assert _rel(fused, ref) < 2**-8
    assert _rel(fused, ref) <= _rel(unfused, ref) * 1.01
    assert _rel(fused_grad, ref_grad) < 2**-8
