"""fused_linear_distill_loss against the reference distill_loss (the contract), on the CPU.

The reference is evaluated in float64 on the explicit logits ``h @ W.T``, computed in the
inputs' dtype as the contract states; its gradients wrt ``h`` / ``W`` come from the float64
logits gradient by the chain rule. Both element-wise implementations are checked: the Triton
kernels (under TRITON_INTERPRET=1, set by conftest.py) and the plain PyTorch path.

Tolerances (norm-wise relative error ||x - ref|| / ||ref||, per dtype):

* fp32 inputs, 1e-5: the only error is fp32 rounding (unit roundoff 6e-8) in the logits GEMM,
  exp2 / log2 and sums of a few hundred terms, a few 1e-7 in practice (up to 2e-6 for reverse
  KL). A wrong term in a formula shows at 1e-3 or more, so 1e-5 separates the two with room on
  both sides. Exception, JSD gradients (0 < beta < 1), 5e-5: dz = p_S (log p_S - log M - KL)
  subtracts nearly equal logarithms, which amplifies the ~1e-6 absolute error of fp32
  log-probabilities of logits/tau ~ 20; PyTorch's own fp32 log_softmax / logaddexp evaluation of
  the same formula lands up to 3.5e-5 from float64 on such inputs (ours: up to 3.8e-5).
* bf16 inputs, loss 1e-4: the logits are rounded to bf16 exactly as in the contract and the
  loss is then computed in fp32 by both, so the loss only carries fp32 rounding (observed
  < 1e-6); the headroom covers a GEMM that blocks its sums differently per chunk and rounds a
  few logits the other way.
* bf16 gradients, 1.5e-2: dz is rounded to bf16 (relative 2^-9 = 2e-3 per element) before the
  two gradient GEMMs, their outputs are rounded to bf16 again, and the weight gradient once more
  per chunk when accumulated in bf16; a few roundings of 2^-9 each give 2-5e-3 (observed),
  which 1.5e-2 bounds with 3x headroom.
"""

from __future__ import annotations

import pytest
import torch

from megatron_distill.losses import distill_loss, fused_linear_distill_loss
from megatron_distill.losses.fused import plan_chunks, resolve_impl
from megatron_distill.losses.kernels import distill_elementwise as ew

TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.bfloat16: dict(loss=1e-4, grad=1.5e-2)}
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch):
    if request.param == "triton":
        # a narrow slice so that every row spans several slices plus a partial one
        monkeypatch.setattr(ew, "_INTERPRET_BLOCK_V", 128)
    return request.param


def _inputs(t, h_s, h_t, v, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, h_s, generator=g, dtype=torch.float64)
    w = torch.randn(v, h_s, generator=g, dtype=torch.float64) * (scale / h_s**0.5)
    ht = torch.randn(t, h_t, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h_t, generator=g, dtype=torch.float64) * (scale / h_t**0.5)
    return [x.to(dtype) for x in (h, w, ht, wt)]


def _reference(h, w, ht, wt, kind, beta, tau, mask, reduction):
    """Loss and grads wrt h, W: float64 reference on the contract's logits."""
    zs = (h @ w.T).double().requires_grad_()
    zt = (ht @ wt.T).double()
    loss = distill_loss(zs, zt, kind, beta=beta, temperature=tau, loss_mask=mask)
    if reduction == "sum":
        loss = loss * (mask.sum().clamp(min=1) if mask is not None else zs.shape[0])
    loss.backward()
    return loss.detach(), zs.grad @ w.double(), zs.grad.T @ h.double()


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _check(h, w, ht, wt, kind, beta, tau, mask, reduction, impl, **kw):
    dtype = h.dtype
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fused_linear_distill_loss(
        h, w, ht, wt, kind, beta=beta, temperature=tau, loss_mask=mask, reduction=reduction, impl=impl, **kw
    )
    loss.backward()
    ref_loss, ref_gh, ref_gw = _reference(h.detach(), w.detach(), ht, wt, kind, beta, tau, mask, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= TOL[dtype]["loss"] * abs(ref_loss.item())
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    tol = TOL[dtype]["grad"]
    if dtype == torch.float32 and kind == "jsd" and 0.0 < beta < 1.0:
        tol = 5e-5
    assert _rel(h.grad, ref_gh) <= tol
    assert _rel(w.grad, ref_gw) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_matches_reference(kind, beta, dtype, impl):
    # V = 301 is no multiple of any block; teacher wider than student; tau != 1
    h, w, ht, wt = _inputs(29, 16, 24, 301, dtype, seed=1, scale=4.0)
    mask = (torch.rand(29, generator=torch.Generator().manual_seed(2)) > 0.35).float()
    # chunks of 8 (not dividing the 18 unmasked rows), teacher sub-chunks of 5
    _check(h, w, ht, wt, kind, beta, 1.7, mask, "mean", impl, chunk_tokens=8, teacher_chunk_tokens=5)
    # no mask, one chunk, sum reduction, tau < 1
    _check(h, w, ht, wt, kind, beta, 0.6, None, "sum", impl)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.7)])
def test_masked_chunks_and_leading_dims(kind, beta, impl):
    # [s, b, h] hidden states; the first 12 tokens (a whole chunk's worth) masked
    h, w, ht, wt = _inputs(24, 8, 12, 77, torch.float32, seed=3, scale=3.0)
    mask = torch.ones(24)
    mask[:12] = 0
    mask[17] = 0
    ref = _reference(h, w, ht, wt, kind, beta, 1.3, mask, "mean")
    h3 = h.view(6, 4, 8).clone().requires_grad_()
    w1 = w.clone().requires_grad_()
    loss = fused_linear_distill_loss(
        h3, w1, ht.view(6, 4, 12), wt, kind, beta=beta, temperature=1.3, loss_mask=mask.view(6, 4),
        chunk_tokens=5, impl=impl,
    )
    loss.backward()
    assert abs(loss.item() - ref[0].item()) <= 1e-5 * ref[0].item()
    assert h3.grad.shape == (6, 4, 8)
    assert _rel(h3.grad.view(24, 8), ref[1]) <= 1e-5
    assert h3.grad.view(24, 8)[:12].abs().max() == 0
    assert _rel(w1.grad, ref[2]) <= 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_all_masked_gives_zero(kind, impl):
    h, w, ht, wt = _inputs(10, 8, 8, 50, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    loss = fused_linear_distill_loss(h, w, ht, wt, kind, loss_mask=torch.zeros(10), impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_teacher_gets_no_grad_and_grad_output_scales(impl):
    h, w, ht, wt = _inputs(12, 8, 10, 64, torch.float32, seed=4)
    ref = _reference(h, w, ht, wt, "jsd", 0.5, 1.0, None, "mean")
    h.requires_grad_()
    w.requires_grad_()
    ht.requires_grad_()
    wt.requires_grad_()
    loss = fused_linear_distill_loss(h, w, ht, wt, "jsd", impl=impl)
    (2.5 * loss).backward()
    assert ht.grad is None and wt.grad is None
    assert _rel(h.grad, 2.5 * ref[1]) <= 1e-5
    assert _rel(w.grad, 2.5 * ref[2]) <= 1e-5


def test_backward_twice_through_a_retained_graph(impl):
    # backward hands autograd the gradients the forward stored (no copy); a second backward
    # through the same graph must still add exactly its own share (on CUDA: test_fused_gpu.py)
    h, w, ht, wt = _inputs(12, 8, 10, 64, torch.float32, seed=4)
    ref = _reference(h, w, ht, wt, "forward_kl", 0.5, 1.0, None, "mean")
    h.requires_grad_()
    w.requires_grad_()
    loss = fused_linear_distill_loss(h, w, ht, wt, "forward_kl", impl=impl)
    loss.backward(retain_graph=True)
    assert _rel(h.grad, ref[1]) <= 1e-5 and _rel(w.grad, ref[2]) <= 1e-5
    (3.0 * loss).backward()
    assert _rel(h.grad, 4.0 * ref[1]) <= 1e-5
    assert _rel(w.grad, 4.0 * ref[2]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_unless_one_kernel(dtype):
    # the backward's scaling kernel (Triton interpreter here): untouched bit for bit at 1, one
    # rounding of the fp32 product otherwise, every element reached (more blocks than programs).
    # bf16 runs on the GPU (test_fused_gpu.py): the interpreter's bf16 casts are not torch's.
    from megatron_distill.losses.kernels.scale_unless_one import scale_unless_one_

    x0 = (torch.randn(3, 7001, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    x = x0.clone()
    scale_unless_one_(x, torch.tensor(1.0))
    assert torch.equal(x, x0)
    scale_unless_one_(x, torch.tensor([-2.7], dtype=torch.float64))
    torch.testing.assert_close(x, (x0.float() * -2.7).to(dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one element"):
        scale_unless_one_(x, torch.ones(2))
    with pytest.raises(ValueError, match="contiguous"):
        scale_unless_one_(x.t(), torch.ones(()))


def test_fp32_weight_grad_accumulator_matches(impl):
    h, w, ht, wt = _inputs(20, 8, 8, 40, torch.bfloat16, seed=5)
    _check(h, w, ht, wt, "forward_kl", 0.5, 1.0, None, "mean", impl, chunk_tokens=6, fp32_weight_grad=True)


@pytest.mark.parametrize("into_dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_into_main_grad(into_dtype, impl):
    """weight_grad_into: the forward adds scale * dL/dW (float64 reference) to what the buffer
    held; the weight gets no autograd gradient, the hidden states the usual one."""
    h, w, ht, wt = _inputs(21, 8, 12, 90, torch.bfloat16, seed=6, scale=3.0)
    mask = (torch.rand(21, generator=torch.Generator().manual_seed(7)) > 0.3).float()
    ref_loss, ref_gh, ref_gw = _reference(h, w, ht, wt, "jsd", 0.4, 1.2, mask, "sum")
    # what earlier micro-batches left: gradients of the same size
    start = torch.randn(w.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    start = (start * ref_gw.pow(2).mean().sqrt()).to(into_dtype)
    main_grad = start.clone()
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fused_linear_distill_loss(h, w, ht, wt, "jsd", beta=0.4, temperature=1.2, loss_mask=mask,
                                     reduction="sum", impl=impl, chunk_tokens=5, weight_grad_into=main_grad,
                                     weight_grad_scale=0.75)
    added = main_grad.double() - start.double()
    # bf16 operands (1.5e-2 as in TOL); a bf16 buffer also rounds after each of the 3 chunks
    tol = 1.5e-2 if into_dtype == torch.float32 else 3e-2
    assert _rel(added, 0.75 * ref_gw) <= tol
    (0.75 * loss).backward()
    assert w.grad is None
    assert _rel(h.grad, 0.75 * ref_gh) <= 1.5e-2
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())


def test_weight_grad_into_checks_the_promised_scale_and_skips_without_grad(impl):
    h, w, ht, wt = _inputs(9, 8, 8, 40, torch.float32, seed=9)
    main_grad = torch.zeros_like(w)
    with torch.no_grad():  # evaluation: no gradient wanted, the buffer is left alone
        fused_linear_distill_loss(h, w.requires_grad_(), ht, wt, "forward_kl", impl=impl, weight_grad_into=main_grad)
    assert main_grad.abs().max() == 0
    loss = fused_linear_distill_loss(h, w, ht, wt, "forward_kl", impl=impl, weight_grad_into=main_grad,
                                     weight_grad_scale=2.0)
    assert main_grad.abs().max() > 0
    with pytest.raises(RuntimeError, match="scaled by 2.0, but the loss received the gradient 3.0"):
        (3.0 * loss).backward()
    with pytest.raises(ValueError, match="weight_grad_into must be"):
        fused_linear_distill_loss(h, w, ht, wt, "forward_kl", impl=impl, weight_grad_into=main_grad[:-1])


@pytest.mark.parametrize("split", [1, 3, 6])
def test_segment_statistics_combine_to_the_row_statistics(split):
    # 300 columns in slices of 64: segments of 64 / 128 columns, partial last slices, and with
    # split 6 an empty sixth segment
    zs = torch.randn(5, 300) * 4
    zt = torch.randn(5, 300) * 4
    for cross in (False, True):
        a = ew.row_stats(zs, zt, 1.3, cross, "triton", split=split, block_v=64)
        assert a.shape == (ew.N_STATS, split, 5)
        b = ew.row_stats(zs, zt, 1.3, cross, "torch")
        # maxima exact; sums of 2^(x - m) agree to fp32 rounding of a few hundred terms
        torch.testing.assert_close(ew.combine_stats(a, 1.3), b, rtol=1e-5, atol=1e-5)


def test_plan_chunks_is_balanced_and_bounded_by_the_weight_gradient():
    cpu = torch.device("cpu")
    assert plan_chunks(100, 10, 8, 4, cpu, chunk_tokens=40) == (34, 34)
    assert plan_chunks(100, 10, 8, 4, cpu, chunk_tokens=40, teacher_chunk_tokens=10) == (34, 10)
    # benchmark cases: buffers within the bf16 weight gradient (0.58 / 0.98 GiB)
    assert plan_chunks(8192, 151936, 2048, 2, cpu) == (1024, 1024)
    assert plan_chunks(16384, 128256, 4096, 2, cpu) == (2048, 2048)
    assert plan_chunks(1000, 151936, 2048, 2, cpu) == (1000, 1000)
    assert plan_chunks(0, 10, 8, 4, cpu) == (1, 1)


def test_plan_chunks_gives_the_teacher_a_quarter_on_the_single_pass_path():
    # same buffer memory as the halves (2048 / 4096 rows); the student chunk is whole sub-chunks
    cpu = torch.device("cpu")
    assert plan_chunks(8192, 151936, 2048, 2, cpu, teacher_quarter=True) == (1536, 512)
    assert plan_chunks(16384, 128256, 4096, 2, cpu, teacher_quarter=True) == (3072, 1024)
    # no more rows than half the buffers: one chunk, one teacher GEMM, as without the quarter
    assert plan_chunks(1000, 151936, 2048, 2, cpu, teacher_quarter=True) == (1000, 1000)
    assert plan_chunks(1500, 151936, 2048, 2, cpu, teacher_quarter=True) == (1500, 512)
    # explicit chunk lengths win
    assert plan_chunks(8192, 151936, 2048, 2, cpu, chunk_tokens=1024, teacher_quarter=True) == (1024, 1024)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_quarter_plan_with_short_last_chunk_matches_reference(kind, beta, impl, monkeypatch):
    # tiny alignment and budget so that 23 tokens take chunks of 6, 6, 6, 5 rows and teacher
    # sub-chunks of 2 (the last chunk's last sub-chunk 1 row): every boundary of the quarter plan
    from megatron_distill.losses import fused

    monkeypatch.setattr(fused, "_ROW_ALIGN", 2)
    monkeypatch.setattr(fused, "_MIN_BUFFER_BYTES", 0)
    monkeypatch.setattr(fused, "_single_pass", lambda cfg: True)  # also for impl="torch": its twin
    assert fused.plan_chunks(23, 40, 8, 4, torch.device("cpu"), teacher_quarter=True) == (6, 2)
    h, w, ht, wt = _inputs(23, 8, 12, 40, torch.float32, seed=7)
    _check(h, w, ht, wt, kind, beta, 1.0, None, "mean", impl)


def test_impl_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("MEGATRON_DISTILL_FUSED_IMPL", "torch")
    assert resolve_impl(None, cpu) == "torch"
    assert resolve_impl("triton", cpu) == "triton"  # TRITON_INTERPRET=1 here
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", cpu)


def test_rejects_bad_arguments():
    h, w, ht, wt = _inputs(4, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_distill_loss(h, w, ht, wt, "jsd", reduction="none")
    with pytest.raises(ValueError, match="kind"):
        fused_linear_distill_loss(h, w, ht, wt, "kl")
    with pytest.raises(ValueError, match="vocab"):
        fused_linear_distill_loss(h, w, ht, wt[:8], "jsd")


def test_loss_step_passes_chunk_tokens_to_the_fused_loss(monkeypatch):
    # --kd-loss-chunk-tokens reaches the chunk planner of the fused loss, and the loss does not
    # depend on it (the contract is the same function for any chunking)
    from megatron_distill import config
    from megatron_distill.losses import fused
    from megatron_distill.pipeline.loss_step import VocabShard, fused_distill_loss_sums

    asked = []
    plan = fused.plan_chunks

    def spy(*args, **kwargs):
        asked.append(args[5])  # chunk_tokens
        return plan(*args, **kwargs)

    monkeypatch.setattr(fused, "plan_chunks", spy)
    s, b, v = 6, 2, 40
    h, w, ht, wt = _inputs(s * b, 8, 12, v, torch.float32, seed=4)
    mask = torch.ones(b, s)
    mask[0, :2] = 0
    sums = []
    for chunk in (None, 3):
        cfg = config.LossConfig(kind="jsd", beta=0.4, chunk_tokens=chunk)
        total, n, _ = fused_distill_loss_sums(h.view(s, b, 8), w, ht.view(s, b, 12), wt, mask, cfg,
                                              VocabShard(0, v), None, False)
        sums.append(total.item())
    assert asked == [None, 3]
    assert n.item() == 10
    assert abs(sums[1] - sums[0]) <= 1e-6 * abs(sums[0])
