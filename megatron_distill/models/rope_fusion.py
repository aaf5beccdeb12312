"""Rotary position embedding in one Triton kernel each way, for Megatron's ``apply_rope_fusion``.

Megatron-Core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) runs about six
element-wise kernels per call forward (cos / sin casts, two products, a negation, a concatenation,
a sum, another concatenation) and as many backward, for the queries and the keys of every layer:
on an H100 at the Llama-1B / 8B shapes that was ~10,000 of a distillation step's 23,035 kernels
and ~9% of its GPU time, and the host time to launch them left the GPU idle between them
(benchmarks/results/e2e_llama_1024_memory_h100_2026-11-23/, calls 8 and 10). Its
fused path needs Transformer Engine's kernel; ``install`` puts this one in its place (when TE's is
absent) and the model's ``TransformerConfig`` sets ``apply_rope_fusion``.

Same math as the unfused path (non-interleaved rotate-half, the first ``rot_dim`` channels rotated,
the rest passed through), computed in fp32 from the fp32 angles and rounded once to the input's
dtype, where the unfused path rounds cos / sin and each product to it (bf16) first.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; the CPU uses the unfused path
    triton = None

ROWS_PER_PROGRAM = 16


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, freqs_ptr, out_ptr, n_rows, B, H, stride_s, stride_b, stride_h, freqs_stride_s,
                     HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_R: tl.constexpr, BACKWARD: tl.constexpr):
        """out[row, k] = x[k] cos(f[k]) + sign_k x[p(k)] sin(f[k]) (forward, sign -1 for k < half)
        or x[k] cos(f[k]) - sign_k x[p(k)] sin(f[p(k)]) (backward: the transpose), p(k) = (k + half)
        mod rot; channels k >= rot pass through. x is [s, b, h, d] with any strides but unit
        channel stride, out contiguous [s * b * h, d]."""
        half: tl.constexpr = ROT_DIM // 2
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        s_idx = rows // (B * H)
        rem = rows % (B * H)
        base = s_idx.to(tl.int64) * stride_s + (rem // H).to(tl.int64) * stride_b + (rem % H).to(tl.int64) * stride_h
        in_head = k < HEAD_DIM
        rotated = k < ROT_DIM
        partner = tl.where(k < half, k + half, k - half)
        mask = row_ok[:, None] & in_head[None, :]
        rot_mask = row_ok[:, None] & rotated[None, :]
        x = tl.load(x_ptr + base[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        x_partner = tl.load(x_ptr + base[:, None] + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        f_base = s_idx.to(tl.int64) * freqs_stride_s
        f = tl.load(freqs_ptr + f_base[:, None] + k[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        sign = tl.where(k < half, -1.0, 1.0)
        if BACKWARD:
            f_partner = tl.load(freqs_ptr + f_base[:, None] + partner[None, :], mask=rot_mask, other=0.0)
            y = x * tl.cos(f) - sign[None, :] * x_partner * tl.sin(f_partner.to(tl.float32))
        else:
            y = x * tl.cos(f) + sign[None, :] * x_partner * tl.sin(f)
        y = tl.where(rotated[None, :], y, x)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + k[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask)


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    s, b, h, d = x.shape
    rot = freqs.shape[-1]
    out = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    n_rows = s * b * h
    if n_rows == 0:
        return out
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    _rope_kernel[grid](
        x, freqs, out, n_rows, b, h, x.stride(0), x.stride(1), x.stride(2), freqs.stride(0),
        HEAD_DIM=d, ROT_DIM=rot, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=ROWS_PER_PROGRAM, BACKWARD=backward,
    )
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _launch(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad_out):
        (freqs,) = ctx.saved_tensors
        return _launch(grad_out, freqs, backward=True), None


def supported(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> bool:
    """Whether the kernel handles this call: non-interleaved, ``t`` ``[s, b, h, d]`` on CUDA (or
    under TRITON_INTERPRET), ``freqs`` ``[s, 1, 1, rot]`` with an even ``rot <= d``."""
    return (
        triton is not None
        and not interleaved
        and t.dim() == 4
        and freqs.dim() == 4
        and freqs.shape[0] == t.shape[0]
        and freqs.shape[1] == 1
        and freqs.shape[2] == 1
        and freqs.shape[3] % 2 == 0
        and freqs.shape[3] <= t.shape[3]
        and freqs.stride(-1) == 1
    )


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
                               **_: object) -> torch.Tensor:
    """RoPE of ``t`` ``[s, b, h, d]`` by the angles ``freqs`` ``[s, 1, 1, rot]`` (fp32, as
    Megatron's ``RotaryEmbedding`` returns them): a new contiguous ``[s, b, h, d]`` tensor in
    ``t``'s dtype. Megatron's unfused function where the kernel does not apply (``supported``)."""
    if not supported(t, freqs, interleaved):
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return _FusedRope.apply(t, freqs.float())


def install() -> bool:
    """Make Megatron's ``apply_rope_fusion`` path call ``fused_apply_rotary_pos_emb`` where
    Transformer Engine's kernel is not installed (Megatron then has None there). Returns whether
    a fused RoPE is available afterwards."""
    if triton is None:
        return False
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    return True
