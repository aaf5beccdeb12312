"""The fused RoPE kernel (megatron_distill/models/rope_fusion.py) against Megatron's unfused RoPE.

Reference: Megatron-Core's own ``_apply_rotary_pos_emb_bshd`` in float64, and its autograd for
the gradient. The kernel runs under TRITON_INTERPRET=1 here (tests/conftest.py) in fp32: the
results agree to fp32 rounding (bound 1e-6 relative, observed ~1e-7; a wrong sign, partner
channel or angle is off by O(1)). On a GPU: tests/gpu/test_rope_fusion_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_distill.models import rope_fusion


def _freqs(s: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    """Megatron's RotaryEmbedding angles: [s, 1, 1, rot], the half-width frequencies twice."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    angles = torch.outer(torch.arange(s, dtype=torch.float32) * 7.0, inv)  # * 7: angles past 2 pi
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rot,arbitrary_angles", [(16, False), (12, False), (16, True)])
def test_forward_and_backward_match_megatron_unfused(rot, arbitrary_angles):
    """rot 12 < d: partial rotary; arbitrary angles: the two halves' angles differ (Megatron's
    always repeat), so the backward must take each partner channel's own angle."""
    s, b, heads, d = 9, 3, 5, 16
    g = torch.Generator().manual_seed(0)
    # a strided view, like Megatron's query (a slice of the fused QKV output)
    qkv = torch.randn(s, b, heads, 3 * d, generator=g).requires_grad_()
    t = qkv[..., d : 2 * d]
    freqs = torch.randn(s, 1, 1, rot, generator=g) * 3 if arbitrary_angles else _freqs(s, rot)
    grad_out = torch.randn(s, b, heads, d, generator=g)

    ref_in = t.detach().double().requires_grad_()
    ref = _apply_rotary_pos_emb_bshd(ref_in, freqs.double())
    ref.backward(grad_out.double())

    out = rope_fusion.fused_apply_rotary_pos_emb(t, freqs)
    out.backward(grad_out)
    assert out.shape == (s, b, heads, d) and out.is_contiguous() and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-6
    grad_t = qkv.grad[..., d : 2 * d]
    assert _rel(grad_t, ref_in.grad) < 1e-6
    assert qkv.grad[..., :d].abs().max() == 0 and qkv.grad[..., 2 * d :].abs().max() == 0
    if rot < d:  # the channels past rot_dim pass through, and so does their gradient
        assert torch.equal(out[..., rot:], t[..., rot:])
        assert torch.equal(grad_t[..., rot:], grad_out[..., rot:])


def test_unsupported_calls_use_megatron_unfused_path():
    s, b, heads, d = 4, 2, 2, 8
    t = torch.randn(s, b, heads, d)
    freqs = _freqs(s, d).expand(s, b, 1, d)  # per-sample angles (mRoPE-like): not the kernel's layout
    assert not rope_fusion.supported(t, freqs)
    torch.testing.assert_close(rope_fusion.fused_apply_rotary_pos_emb(t, freqs),
                               _apply_rotary_pos_emb_bshd(t, freqs), rtol=0, atol=0)
    assert not rope_fusion.supported(t, _freqs(s, d), interleaved=True)


def test_install_plugs_into_megatron_apply_rope_fusion(monkeypatch):
    from megatron.core.transformer import TransformerConfig

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)  # as without TE
    with pytest.raises(Exception, match="apply_rope_fusion"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, apply_rope_fusion=True)
    assert rope_fusion.install()
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, apply_rope_fusion=True)
    s, b, heads, d = 5, 2, 2, 4
    t = torch.randn(s, b, heads, d)
    freqs = _freqs(s, d)
    out = rope_utils.apply_rotary_pos_emb(t, freqs, config=config, cp_group=object())  # cp: thd only
    assert _rel(out, _apply_rotary_pos_emb_bshd(t.double(), freqs.double())) < 1e-6
