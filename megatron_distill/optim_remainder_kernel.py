"""One Triton kernel for RemainderAdamW's update of a parameter tensor (CUDA, or TRITON_INTERPRET=1).

The torch version in ``optim_remainder`` runs ~15 element-wise kernels per 16 M-element slice
with fp32 temporaries between them; this reads the bf16 weight, int16 remainder, gradient and
both moments once and writes weight, remainder and moments once (18 bytes per parameter with
bf16 gradients and moments). Same arithmetic in the same order as torch.optim.AdamW's single-tensor
path, with correctly rounded sqrt and division, so results agree with the torch version to fp32
rounding (tests/unit/test_optim_remainder.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _load_as_fp32(ptr, offsets, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # int16 view of a bf16 tensor: the fp32 with those top 16 bits (exact)
        return (tl.load(ptr + offsets, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_from_fp32(ptr, offsets, value, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # round to nearest even in integer arithmetic (the interpreter truncates casts)
        bits = value.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr + offsets, rounded.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offsets, value, mask=mask)


@triton.jit
def _adamw_remainder_kernel(weight_ptr, remainder_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n,
                            decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                            bias_correction2_sqrt, GRAD_BF16: tl.constexpr, EXP_AVG_BF16: tl.constexpr,
                            EXP_AVG_SQ_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    high = tl.load(weight_ptr + offsets, mask=mask, other=0).to(tl.int32)  # int16 bits, sign-extended
    low = tl.load(remainder_ptr + offsets, mask=mask, other=0).to(tl.int32)
    master = ((high << 16) + low).to(tl.float32, bitcast=True)
    grad = _load_as_fp32(grad_ptr, offsets, mask, GRAD_BF16)
    exp_avg = _load_as_fp32(exp_avg_ptr, offsets, mask, EXP_AVG_BF16)
    exp_avg_sq = _load_as_fp32(exp_avg_sq_ptr, offsets, mask, EXP_AVG_SQ_BF16)

    master = master * decay
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)  # torch's lerp for weight < 0.5
    exp_avg_sq = exp_avg_sq * beta2
    exp_avg_sq = exp_avg_sq + one_minus_beta2 * (grad * grad)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    master = master + (-step_size) * tl.div_rn(exp_avg, denom)

    bits = master.to(tl.int32, bitcast=True)
    high = (bits + 0x8000) >> 16  # nearest bf16, halfway away from zero (as split_master)
    low = bits - (high << 16)
    tl.store(weight_ptr + offsets, high.to(tl.int16), mask=mask)
    tl.store(remainder_ptr + offsets, low.to(tl.int16), mask=mask)
    _store_from_fp32(exp_avg_ptr, offsets, exp_avg, mask, EXP_AVG_BF16)
    _store_from_fp32(exp_avg_sq_ptr, offsets, exp_avg_sq, mask, EXP_AVG_SQ_BF16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def adamw_remainder_update_(weight: torch.Tensor, remainder: torch.Tensor, grad: torch.Tensor,
                            exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float, beta1: float,
                            beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step in place on contiguous tensors of one shape.

    ``weight`` bf16 and ``remainder`` int16 hold the fp32 master; ``grad`` fp32 or bf16;
    ``exp_avg`` / ``exp_avg_sq`` fp32 or bf16. ``step`` counts from 1.
    """
    n = weight.numel()
    if n == 0:
        return
    beta1_correction = 1 - beta1**step
    _adamw_remainder_kernel[(triton.cdiv(n, BLOCK),)](
        weight.view(torch.int16), remainder, _bits(grad), _bits(exp_avg), _bits(exp_avg_sq), n,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / beta1_correction,
        math.sqrt(1 - beta2**step), GRAD_BF16=grad.dtype == torch.bfloat16,
        EXP_AVG_BF16=exp_avg.dtype == torch.bfloat16, EXP_AVG_SQ_BF16=exp_avg_sq.dtype == torch.bfloat16,
        BLOCK=BLOCK,
    )
