"""The fused RoPE kernel, compiled on a GPU, at the Llama-1B student's attention shapes in bf16.

Reference: Megatron-Core's unfused RoPE in float64. The kernel computes in fp32 and rounds once
to bf16 (relative error ~2^-9 / sqrt(3) per element, ~1.1e-3 norm-wise; bound 4e-3); Megatron's
unfused bf16 path rounds cos / sin, both products and their sum to bf16, so the kernel must be at
least as close to float64 as it (with 10% slack for the two being equal up to noise).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_distill.models import rope_fusion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("heads,rot", [(32, 64), (8, 64), (32, 32)])
def test_bf16_kernel_against_float64(heads, rot):
    s, b, d = 1024, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(s, b, heads, 2 * d, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    t = qkv[..., :d]  # strided, like Megatron's query
    inv = 1.0 / 500000 ** (torch.arange(0, rot, 2, device="cuda", dtype=torch.float32) / rot)
    angles = torch.outer(torch.arange(s, device="cuda", dtype=torch.float32), inv)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    grad_out = torch.randn(s, b, heads, d, generator=g, device="cuda").to(torch.bfloat16)

    ref_in = t.detach().double().requires_grad_()
    ref = _apply_rotary_pos_emb_bshd(ref_in, freqs.double())
    ref.backward(grad_out.double())
    unfused = _apply_rotary_pos_emb_bshd(t.detach(), freqs)

    out = rope_fusion.fused_apply_rotary_pos_emb(t, freqs)
    out.backward(grad_out)
    err, err_unfused = _rel(out, ref.detach()), _rel(unfused, ref.detach())
    err_grad = _rel(qkv.grad[..., :d], ref_in.grad)
    print(f"heads {heads} rot {rot}: fused {err:.2e}, unfused bf16 {err_unfused:.2e}, grad {err_grad:.2e}")
    assert err <= 4e-3 and err_grad <= 4e-3
    assert err <= 1.1 * err_unfused
    assert qkv.grad[..., d:].abs().max() == 0
