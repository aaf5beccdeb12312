"""RemainderAdamW: exact fp32 master weights as bf16 weight + int16 remainder, against torch's AdamW.

References: the bit patterns themselves (split/join must be lossless), torch.optim.AdamW stepping
fp32 master weights (the precision-aware optimizer with fp32 moments must follow it to fp32
rounding), and a float64 AdamW (bf16 moments stay within what 8 mantissa bits allow).
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_distill import optim_remainder
from megatron_distill.optim_remainder import RemainderAdamW, join_master, split_master


def _awkward_fp32(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n).view(-1)[torch.randperm(n, generator=gen)]
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0 + 2**-23, -(1.0 + 2**-9), 2**-126, -(2**-149), 3.0e38, -3.0e38])
    # Values exactly halfway between two bf16 numbers (low 16 bits 0x8000), both signs.
    halfway = (torch.tensor([0x3F808000, 0x3F818000, 0x40490000 | 0x8000], dtype=torch.int32)
               .view(torch.float32))
    return torch.cat([values, special, halfway, -halfway])


def test_split_then_join_is_bitwise_lossless():
    master = _awkward_fp32(100_000)
    weight, remainder = split_master(master)
    assert weight.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert torch.equal(join_master(weight, remainder).view(torch.int32), master.view(torch.int32))


def test_weight_is_the_nearest_bf16():
    master = _awkward_fp32(100_000, seed=1)
    weight, _ = split_master(master)
    nearest = master.to(torch.bfloat16)  # torch: nearest, ties to even
    low = master.view(torch.int32) & 0xFFFF
    not_tie = low != 0x8000
    assert torch.equal(weight[not_tie].view(torch.int16), nearest[not_tie].view(torch.int16))
    # Ties go away from zero: the magnitude rounds up.
    assert (weight[~not_tie].float().abs() > master[~not_tie].abs()).all()


def _pair(shapes, seed=0):
    """Matching parameters: bf16 ones for RemainderAdamW and fp32 masters (their exact values)."""
    gen = torch.Generator().manual_seed(seed)
    masters = [torch.randn(s, generator=gen) for s in shapes]
    bf16 = [torch.nn.Parameter(m.to(torch.bfloat16)) for m in masters]
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in bf16]
    return bf16, fp32


def _grads(shapes, step, seed=10):
    gen = torch.Generator().manual_seed(seed + step)
    return [torch.randn(s, generator=gen) * 0.1 for s in shapes]


SHAPES = [(33, 17), (64,), (5, 3, 7)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _run(optimizer, params, steps, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(SHAPES, step), strict=True):
            p.main_grad = g.clone()  # fp32 gradient where Megatron's DDP keeps it
        optimizer.step()


def test_fp32_moments_follow_torch_adamw_on_fp32_masters():
    bf16, fp32 = _pair(SHAPES)
    ours = RemainderAdamW(bf16, **HYPER)
    reference = torch.optim.AdamW(fp32, foreach=False, **HYPER)
    for step in range(20):
        for p, q, g in zip(bf16, fp32, _grads(SHAPES, step), strict=True):
            p.main_grad = g.clone()
            q.grad = g.clone()
        ours.step()
        reference.step()
    for p, q in zip(bf16, fp32, strict=True):
        master = join_master(p.detach(), ours.state[p]["param_remainder"])
        torch.testing.assert_close(master, q.detach(), rtol=2e-7, atol=1e-9)
        # The bf16 weight the model computes with is its master rounded.
        assert torch.equal(p.detach(), split_master(master)[0])
        assert ours.state[p]["exp_avg"].dtype == torch.float32
    # Bits the bf16 weights alone would have lost: the masters moved by less than a bf16 ulp.
    moved = [join_master(p.detach(), ours.state[p]["param_remainder"]) - p.detach().float() for p in bf16]
    assert any(m.abs().max() > 0 for m in moved)


def _float64_adamw(masters, steps):
    masters = [m.double().clone() for m in masters]
    ms = [torch.zeros_like(m) for m in masters]
    vs = [torch.zeros_like(m) for m in masters]
    b1, b2 = HYPER["betas"]
    lr, wd, eps = HYPER["lr"], HYPER["weight_decay"], HYPER["eps"]
    for step in range(steps):
        t = step + 1
        for x, m, v, g in zip(masters, ms, vs, _grads(SHAPES, step), strict=True):
            g = g.double()
            x.mul_(1 - lr * wd)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            x.sub_(lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps))
    return masters


def test_bf16_moments_stay_close_to_float64_adamw():
    bf16, fp32 = _pair(SHAPES)
    start = [p.detach().double().clone() for p in fp32]
    ours = RemainderAdamW(bf16, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16, **HYPER)
    _run(ours, bf16, 20)
    reference = _float64_adamw(start, 20)
    for p, ref, x0 in zip(bf16, reference, start, strict=True):
        assert ours.state[p]["exp_avg"].dtype == torch.bfloat16
        assert ours.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        master = join_master(p.detach(), ours.state[p]["param_remainder"]).double()
        # The update (not the weight) is what the moments' precision affects: within a few bf16 ulps.
        error = (master - ref).norm() / (ref - x0).norm()
        assert error < 2e-2, error


def test_slicing_does_not_change_the_result(monkeypatch):
    bf16_a, _ = _pair(SHAPES)
    bf16_b = [torch.nn.Parameter(p.detach().clone()) for p in bf16_a]
    whole = RemainderAdamW(bf16_a, exp_avg_dtype=torch.bfloat16, **HYPER)
    _run(whole, bf16_a, 5)
    monkeypatch.setattr(optim_remainder, "SLICE_ELEMENTS", 7)  # slices that cut rows
    sliced = RemainderAdamW(bf16_b, exp_avg_dtype=torch.bfloat16, **HYPER)
    _run(sliced, bf16_b, 5)
    for a, b in zip(bf16_a, bf16_b, strict=True):
        assert torch.equal(a, b)
        for key in ("param_remainder", "exp_avg", "exp_avg_sq"):
            assert torch.equal(whole.state[a][key], sliced.state[b][key])


def test_state_dict_round_trip_keeps_fp32_moments_and_continues_exactly():
    bf16_a, _ = _pair(SHAPES)
    first = RemainderAdamW(bf16_a, **HYPER)
    _run(first, bf16_a, 4)
    saved = copy.deepcopy(first.state_dict())
    weights = [p.detach().clone() for p in bf16_a]
    _run(first, bf16_a, 3, start=4)

    bf16_b = [torch.nn.Parameter(w.clone()) for w in weights]
    second = RemainderAdamW(bf16_b, **HYPER)
    second.load_state_dict(saved)
    for p in bf16_b:
        # torch would have cast these to the parameter's dtype (bf16).
        assert second.state[p]["exp_avg"].dtype == torch.float32
        assert second.state[p]["exp_avg_sq"].dtype == torch.float32
        assert second.state[p]["param_remainder"].dtype == torch.int16
    _run(second, bf16_b, 3, start=4)
    for a, b in zip(bf16_a, bf16_b, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(first.state[a]["param_remainder"], second.state[b]["param_remainder"])


def test_group_lr_and_weight_decay_are_used():
    bf16, _ = _pair([(8, 8), (8,)])
    optimizer = RemainderAdamW([{"params": [bf16[0]], "lr": 0.0, "weight_decay": 0.0},
                                {"params": [bf16[1]], "lr": 1e-2, "weight_decay": 0.0}])
    before = [p.detach().clone() for p in bf16]
    for p in bf16:
        p.grad = torch.ones_like(p)  # no main_grad: the plain .grad is read
    optimizer.step()
    assert torch.equal(bf16[0], before[0])
    # First Adam step with a constant gradient moves every weight by lr (m / sqrt(v) = 1).
    moved = join_master(bf16[1].detach(), optimizer.state[bf16[1]]["param_remainder"]) - before[1].float()
    torch.testing.assert_close(moved, torch.full_like(moved, -1e-2), rtol=1e-5, atol=0)


def test_refuses_fp32_parameters():
    with pytest.raises(TypeError, match="bf16 parameters"):
        RemainderAdamW([torch.nn.Parameter(torch.zeros(3))])


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernel runs under TRITON_INTERPRET=1


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_the_torch_ops(moments, grad_dtype):
    # Sizes around the kernel's block (2048): a partial last block, fewer elements than a block.
    shapes = [(3000,), (17, 5), (2048,)]
    gen = torch.Generator().manual_seed(3)
    bf16 = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16).to(_device())) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in bf16]
    opts = [RemainderAdamW(ps, exp_avg_dtype=moments, exp_avg_sq_dtype=moments, use_kernel=k, **HYPER)
            for ps, k in ((bf16, True), (twins, False))]
    for _step in range(6):
        grads = [torch.randn(s, generator=gen).to(grad_dtype).to(_device()) for s in shapes]
        for p, q, g in zip(bf16, twins, grads, strict=True):
            p.main_grad, q.main_grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    kernel, ops = opts
    for p, q in zip(bf16, twins, strict=True):
        a = join_master(p.detach(), kernel.state[p]["param_remainder"])
        b = join_master(q.detach(), ops.state[q]["param_remainder"])
        # Equal up to fp32 rounding of a different evaluation order (torch's lerp / addcdiv). With
        # bf16 moments such a difference can round a moment to the neighbouring bf16 value (2^-8
        # relative), changing that element's later updates (each <= ~lr) by up to 2^-8 of themselves.
        atol = 1e-9 if moments == torch.float32 else 6 * HYPER["lr"] * 2**-7
        torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)
        for key in ("exp_avg", "exp_avg_sq"):
            assert kernel.state[p][key].dtype == moments
            scale = ops.state[q][key].float().abs().max().item()
            torch.testing.assert_close(kernel.state[p][key].float(), ops.state[q][key].float(),
                                       rtol=0, atol=scale * (1e-6 if moments == torch.float32 else 1e-2))
