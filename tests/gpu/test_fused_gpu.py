"""fused_linear_distill_loss on a GPU at the benchmark shapes, against an fp32 reference.

T = 8192 tokens, h_s = 2048, h_t = 4096, V = 151936, bf16. The reference follows the contract:
logits are the bf16 products ``h @ W.T``, upcast to fp32 for ``distill_loss``; it runs over
256-token slices so its fp32 logits fit, and its gradients wrt h and W are fp32 products of
the fp32 logits gradient (TF32 off), accumulated over the slices in fp32.

Bounds (norm-wise relative error):

* loss, 1e-3: both sides compute the loss in fp32 from bf16 logits; the fused path's GEMMs have
  other row counts than the reference's, so cuBLAS may pick kernels that sum in another order
  and round a few logits to the neighbouring bf16 value (2^-8 relative), and Triton's exp2 /
  log2 are the approximate hardware ones (about 2 ulp). Observed errors are ~1e-6.
* gradients, 1.5e-2: the fused path rounds dz to bf16 (2^-9 relative) before the two gradient
  GEMMs, rounds their outputs to bf16, and re-rounds the weight gradient once per chunk when
  accumulating it in bf16; the reference keeps all of that in fp32. A few roundings of 2^-9
  give ~3-5e-3, bounded with 3x headroom.
"""

from __future__ import annotations

import pytest
import torch

from megatron_distill.losses import fused_linear_distill_loss
from megatron_distill.losses.reference import distill_loss_per_token

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

T, H_S, H_T, V = 8192, 2048, 4096, 151936
SLICE = 256


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(torch.bfloat16)

    # logits with std ~2, about what trained LM heads produce
    h, ht = randn(T, H_S), randn(T, H_T)
    w, wt = randn(V, H_S, std=2.0 / H_S**0.5), randn(V, H_T, std=2.0 / H_T**0.5)
    return h, w, ht, wt


def _reference(h, w, ht, wt, kind, beta, tau, mask, reduction):
    w32 = w.float()
    loss = torch.zeros((), dtype=torch.float64, device="cuda")
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device="cuda")
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device="cuda")
    for r0 in range(0, T, SLICE):
        rows = slice(r0, r0 + SLICE)
        zs = (h[rows] @ w.T).float().requires_grad_()
        with torch.no_grad():
            zt = (ht[rows] @ wt.T).float()
        per_token = distill_loss_per_token(zs, zt, kind, beta=beta, temperature=tau)
        part = per_token.sum() if mask is None else (per_token * mask[rows]).sum()
        part.backward()
        loss += part.detach().double()
        grad_h[rows] = zs.grad @ w32
        grad_w += zs.grad.T @ h[rows].float()
    if reduction == "mean":
        n = T if mask is None else mask.sum().clamp(min=1)
        loss, grad_h, grad_w = loss / n, grad_h / n, grad_w / n
    return loss, grad_h, grad_w


def _rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "kind,beta,tau,masked,reduction",
    [
        ("jsd", 0.5, 1.0, False, "mean"),
        ("forward_kl", 0.5, 2.0, True, "sum"),
        ("reverse_kl", 0.5, 1.0, True, "mean"),
        ("jsd", 0.1, 0.7, False, "sum"),
    ],
)
def test_fused_matches_fp32_reference_at_benchmark_shapes(inputs, kind, beta, tau, masked, reduction):
    h, w, ht, wt = inputs
    mask = None
    if masked:
        g = torch.Generator(device="cuda").manual_seed(1)
        mask = (torch.rand(T, generator=g, device="cuda") > 0.4).float()
    hs = h.clone().requires_grad_()
    ws = w.clone().requires_grad_()
    loss = fused_linear_distill_loss(
        hs, ws, ht, wt, kind, beta=beta, temperature=tau, loss_mask=mask, reduction=reduction
    )
    loss.backward()
    ref_loss, ref_gh, ref_gw = _reference(h, w, ht, wt, kind, beta, tau, mask, reduction)
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-3 * abs(ref_loss.item())
    assert _rel(hs.grad, ref_gh) <= 1.5e-2
    assert _rel(ws.grad, ref_gw) <= 1.5e-2
    print(
        f"{kind} beta={beta} tau={tau} masked={masked}: loss rel "
        f"{abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()):.2e}, "
        f"grad_h {_rel(hs.grad, ref_gh):.2e}, grad_W {_rel(ws.grad, ref_gw):.2e}"
    )


@pytest.mark.parametrize("into_dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_into_main_grad_at_benchmark_shapes(inputs, into_dtype):
    """The weight gradient added into a main_grad buffer (fp32: cuBLAS's bf16 x bf16 -> fp32
    addmm with alpha; bf16: plain addmm), scaled, on top of what the buffer held."""
    h, w, ht, wt = inputs
    ref_loss, ref_gh, ref_gw = _reference(h, w, ht, wt, "jsd", 0.5, 1.0, None, "sum")
    g = torch.Generator(device="cuda").manual_seed(2)
    start = (torch.randn(w.shape, generator=g, device="cuda") * ref_gw.pow(2).mean().sqrt()).to(into_dtype)
    main_grad = start.clone()
    hs = h.clone().requires_grad_()
    ws = w.clone().requires_grad_()
    loss = fused_linear_distill_loss(hs, ws, ht, wt, "jsd", reduction="sum", weight_grad_into=main_grad,
                                     weight_grad_scale=0.5)
    (0.5 * loss).backward()
    assert ws.grad is None
    # a bf16 buffer also rounds the running sum once per chunk (8 here): ~5e-3 more
    tol = 1.5e-2 if into_dtype == torch.float32 else 3e-2
    assert _rel(main_grad.float() - start.float(), 0.5 * ref_gw) <= tol
    assert _rel(hs.grad, 0.5 * ref_gh) <= 1.5e-2


def _multi_pass(zs: torch.Tensor, zt: torch.Tensor, kind: str) -> torch.Tensor:
    """The multi-pass kernels' loss partials ``[P, rows]`` (beta 0.3, tau 1.3, grad scale 0.01);
    ``zs`` ``[rows, V]`` becomes dz."""
    from megatron_distill.losses.kernels import distill_elementwise as ew

    stats = ew.row_stats(zs, zt, 1.3, kind == "reverse_kl")
    loss = torch.empty((stats.shape[1], zs.shape[0]), device=zs.device)
    if kind == "jsd":
        kl = ew.jsd_row_sums(zs, zt, stats, loss, beta=0.3, temperature=1.3)
        ew.jsd_grad_(zs, zt, stats, kl, beta=0.3, temperature=1.3, grad_scale=0.01)
    else:
        ew.kl_loss_grad_(zs, zt, stats, loss, reverse=kind == "reverse_kl", temperature=1.3, grad_scale=0.01)
    return loss


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "variant,segments,block_v",
    [("reread", 16, None), ("reread", 16, 1024), ("pipelined", 4, None), ("pipelined", 24, None),
     ("pipelined", 64, None)],
)
def test_single_pass_kernel_matches_multi_pass(kind, dtype, variant, segments, block_v):
    # The single-launch paths (TP = 1) synchronise the programs of a row through counters in
    # global memory, which the CPU interpreter cannot run with more than one program per row:
    # check them here on odd shapes (V no multiple of the slice or tile, 1 row, more programs
    # than work) against the multi-pass kernels. Both compute in fp32 from the same logits and
    # differ only in the order of the row sums: 1e-5 (fp32 dz), bf16 dz within one rounding.
    from megatron_distill.losses.kernels import distill_elementwise as ew

    g = torch.Generator(device="cuda").manual_seed(3)
    for rows, v in ((1, 301), (7, 5003), (300, 40000), (1024, 151936)):
        zs0 = (torch.randn(rows, v, generator=g, device="cuda") * 3).to(dtype)
        zt = (torch.randn(rows, v, generator=g, device="cuda") * 3).to(dtype)
        a, b = zs0.clone(), zs0.clone()
        split = ew.single_pass_split(v, a.device, segments, block_v, kind=kind, variant=variant, dtype=dtype)
        loss_a = torch.full((split, rows), float("nan"), device="cuda")
        for _ in range(2):  # the second launch runs with the measured occupancy
            a.copy_(zs0)
            counters = ew.single_pass_loss_grad_(
                a, zt, loss_a, kind=kind, beta=0.3, temperature=1.3, grad_scale=0.01, variant=variant,
                block_v=block_v,
            )
        loss_b = _multi_pass(b, zt, kind)
        torch.cuda.synchronize()
        la, lb = loss_a.sum(0), loss_b.sum(0)
        assert torch.isfinite(la).all() and torch.isfinite(a.float()).all()
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert _rel(a, b.float()) <= tol, (rows, v, split)
        # a resident grid meets without timing out (the repair launch stays idle)
        assert (counters >= 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("max_polls", [0, 2, 16])
def test_single_pass_rows_that_time_out_are_redone(kind, max_polls, monkeypatch):
    # Polling budgets this small make programs give up on peers that are resident but a few
    # microseconds late: rows time out at their first meeting (or JSD's second), nobody writes
    # them, and the repair launch redoes them whole. The result must equal the multi-pass
    # kernels' (fp32 logits: only the order of the row sums differs) whichever rows timed out.
    from megatron_distill.losses.kernels import distill_elementwise as ew

    monkeypatch.setitem(ew.KERNEL_CONFIG, "sp_max_polls", max_polls)
    g = torch.Generator(device="cuda").manual_seed(4)
    rows, v = 1024, 151936
    zs0 = torch.randn(rows, v, generator=g, device="cuda") * 3
    zt = torch.randn(rows, v, generator=g, device="cuda") * 3
    a, b = zs0.clone(), zs0.clone()
    split = ew.single_pass_split(v, a.device, kind=kind, variant="reread")
    loss_a = torch.full((split, rows), float("nan"), device="cuda")
    counters = ew.single_pass_loss_grad_(
        a, zt, loss_a, kind=kind, beta=0.3, temperature=1.3, grad_scale=0.01, variant="reread"
    )
    loss_b = _multi_pass(b, zt, kind)
    timed_out = (counters < 0).sum(dim=1).tolist()
    print(f"{kind} max_polls={max_polls}: rows timed out at meeting 1 / 2: {timed_out}")
    if max_polls == 0:
        assert timed_out[0] > 0  # the path under test was taken
    torch.testing.assert_close(loss_a.sum(0), loss_b.sum(0), rtol=1e-5, atol=1e-6)
    assert _rel(a, b) <= 1e-5


@pytest.mark.parametrize(
    "build", ["c8t256s1m2", "c8t128s1m2", "c8t256", "c16t256m2or", "c8t256s1m2ou2", "c8t256s1m2p", "c8t128s1m5opl",
              "c8t256m2pl", "c8t128s1m2h", "c8t128s1m2hq",
              "c8t256s1m2a", "c8t128s1m2hqa", "c8t256s1m3av", "c8t128s1m2hqav", "c8t128s1m5oplv", "c8t256s1m2ab",
              "c8t128s1m2hqab", "c8t128s1m5oplb", "c8t128s1m2ab", "c8t128s1m2abnf", "c8t128s1m2hqanf", "c8t256nf",
              "c8t128s1m2ohqaf", "c8t128s1m5oplbnf", "c8t128s1m2abnfe", "c8t128s1m2hqanfe", "c8t128s1m2hqabnfe",
              "c8t256fe", "c8t128s1m2hafe", "c8t128s1m2ofe"]
)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_cluster_kernel_matches_multi_pass(kind, build, monkeypatch):
    # The thread-block-cluster kernel (cluster_single_pass.cu) on bf16 rows, in the default builds
    # (KL, JSD), the two-stage build and builds with every compile-time option (16-block clusters,
    # two blocks per multiprocessor, one row stage, online statistics, one-barrier reductions,
    # unrolled loops, the next row prefetched into L2, the student segment read from L2 with one
    # and two stages, JSD's log-ratio kept in fp16 for the dz pass, and with it p_S, relaxed
    # cluster arrivals, each thread's next vectors read ahead, the next row's copy started by the
    # dz pass, with the student segment held or read from L2, no block barrier around a row's copy,
    # maxima on bf16 pairs and fma exponents in the sums, log-probabilities as one fma): odd row
    # counts, segments that end before the cluster's last block (V = 128 + 8), rows that are
    # slices of a wider buffer (as the fused loss passes them), the benchmark vocabularies, more
    # rows than resident clusters, and logits of an LLM's size (maxima near 50, where a rounded m c
    # would move every log-probability by ~2e-6) with the teacher equal to the student in 90% of the vocabulary
    # (dz small, so its own errors show). Against the multi-pass Triton kernels on the same logits:
    # both compute in fp32, differing only in the order of the row sums (1e-5) and, for dz, by at
    # most one bf16 rounding (8e-3 norm-wise, as the Triton single pass).
    from megatron_distill.losses.kernels import cluster_single_pass as cluster
    from megatron_distill.losses.kernels import distill_elementwise as ew

    monkeypatch.setitem(ew.KERNEL_CONFIG, "cluster_build", build)
    b_cfg = cluster.parse_build(build)
    g = torch.Generator(device="cuda").manual_seed(5)
    shapes = ((1, 136, 0, False), (7, 5008, 8, False), (300, 40000, 0, False), (513, 128256, 0, False),
              (1024, 151936, 0, False), (64, 32000, 0, True))
    for rows, v, pad, llm_like in shapes:
        against_fp64 = v in (40000, 32000)
        if llm_like:
            buf = (torch.randn(rows + 2, v + pad, generator=g, device="cuda") * 6 + 25).to(torch.bfloat16)
            differs = torch.rand(rows, v, generator=g, device="cuda") < 0.1
            noise = torch.randn(rows, v, generator=g, device="cuda") * differs
            zt = (buf[1 : rows + 1, :v].float() + noise).to(torch.bfloat16)
        else:
            buf = (torch.randn(rows + 2, v + pad, generator=g, device="cuda") * 3).to(torch.bfloat16)
            zt = (torch.randn(rows, v, generator=g, device="cuda") * 3).to(torch.bfloat16)
        zs0 = buf[1 : rows + 1, :v]  # strided rows when pad > 0
        assert cluster.usable(zs0, zt, b_cfg), (rows, v)
        z64 = zs0.double().requires_grad_() if against_fp64 else None  # before b (maybe zs0 itself) becomes dz
        a_buf = buf.clone()
        a, b = a_buf[1 : rows + 1, :v], zs0.contiguous()
        split = ew.single_pass_split(v, a.device, kind=kind, variant="cluster")
        assert split == b_cfg.cluster
        loss_a = torch.full((split, rows), float("nan"), device="cuda")
        counters = ew.single_pass_loss_grad_(
            a, zt, loss_a, kind=kind, beta=0.3, temperature=1.3, grad_scale=0.01, variant="cluster"
        )
        assert counters is None  # the cluster kernel ran, not the Triton fallback
        loss_b = _multi_pass(b, zt, kind)
        torch.cuda.synchronize()
        la, lb = loss_a.sum(0), loss_b.sum(0)
        assert torch.isfinite(la).all() and torch.isfinite(a.float()).all()
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        assert _rel(a, b.float()) <= 8e-3, (rows, v)
        if against_fp64:
            # against the float64 gradient of the same bf16 logits: both round dz to bf16 (their
            # common error, ~1.7e-3 norm-wise at V = 40000); JSD's fp16 log-ratio (build option h)
            # adds its own, measured 1.13-1.20x the rounding alone (cluster_probe, 2026-12-07); its
            # fp16 p_S (q) at most a quarter of one bf16 rounding more
            per_token = distill_loss_per_token(z64, zt.double(), kind, beta=0.3, temperature=1.3)
            exact = torch.autograd.grad(per_token.sum() * 0.01, z64)[0].float()
            bound = 1.3 if b_cfg.store_log_ratio and kind == "jsd" else 1.02
            assert _rel(a, exact) <= bound * _rel(b, exact), (kind, _rel(a, exact), _rel(b, exact))
        # the rows around the slice are untouched
        assert torch.equal(a_buf[0], buf[0]) and torch.equal(a_buf[rows + 1], buf[rows + 1])


def test_cluster_variant_falls_back_where_it_cannot_run():
    # fp32 logits and rows that are no whole number of 16-byte vectors take the Triton kernel
    from megatron_distill.losses.kernels import cluster_single_pass as cluster
    from megatron_distill.losses.kernels import distill_elementwise as ew

    g = torch.Generator(device="cuda").manual_seed(6)
    for dtype, v in ((torch.float32, 4096), (torch.bfloat16, 5003)):
        zs0 = (torch.randn(33, v, generator=g, device="cuda") * 3).to(dtype)
        zt = (torch.randn(33, v, generator=g, device="cuda") * 3).to(dtype)
        assert not cluster.usable(zs0, zt)
        a, b = zs0.clone(), zs0.clone()
        split = ew.single_pass_split(v, a.device, kind="jsd", variant="cluster", dtype=dtype)
        loss_a = torch.zeros((split, 33), device="cuda")
        counters = ew.single_pass_loss_grad_(
            a, zt, loss_a, kind="jsd", beta=0.3, temperature=1.3, grad_scale=0.01, variant="cluster"
        )
        assert counters is not None  # the Triton single pass ran
        loss_b = _multi_pass(b, zt, "jsd")
        torch.testing.assert_close(loss_a.sum(0), loss_b.sum(0), rtol=1e-5, atol=1e-6)
        assert _rel(a, b.float()) <= (1e-5 if dtype == torch.float32 else 8e-3)


def test_free_bytes_counts_the_allocators_idle_blocks():
    """plan_chunks' free memory: the device's free bytes plus what the caching allocator holds
    unused, read from one statistics call (torch.cuda.memory_reserved / memory_allocated each
    flatten the statistics in Python, ~0.2 ms per call before every loss call's first GEMM)."""
    from megatron_distill.losses.fused import _free_bytes

    dev = torch.device("cuda")
    held = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    del held  # 64 MiB now idle in the allocator's cache
    torch.cuda.synchronize()
    expect = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    got = _free_bytes(dev)
    assert abs(got - expect) <= 2 << 20  # other processes may allocate in between
    assert got - torch.cuda.mem_get_info(dev)[0] >= 64 << 20


def test_backward_scales_on_the_gpu_without_a_host_read():
    # the backward's in-place scaling kernel on bf16 CUDA tensors: bits untouched at 1, one
    # rounding of the fp32 product otherwise; and through the fused loss: a factor, and a second
    # backward through the retained graph (the ratio of the factors), against the float64 math
    from megatron_distill.losses.kernels.scale_unless_one import scale_unless_one_

    g = torch.Generator(device="cuda").manual_seed(3)
    x0 = (torch.randn(1000, 3001, generator=g, device="cuda") * 4).to(torch.bfloat16)
    x = x0.clone()
    scale_unless_one_(x, torch.ones((), device="cuda"))
    assert torch.equal(x, x0)
    scale_unless_one_(x, torch.full((), -2.7, device="cuda"))
    assert torch.equal(x, (x0.float() * -2.7).to(torch.bfloat16))

    t, hs, ht_dim, v = 96, 64, 80, 1000
    h = torch.randn(t, hs, generator=g, device="cuda", dtype=torch.float64)
    w = torch.randn(v, hs, generator=g, device="cuda", dtype=torch.float64) / hs**0.5
    ht = torch.randn(t, ht_dim, generator=g, device="cuda", dtype=torch.float64)
    wt = torch.randn(v, ht_dim, generator=g, device="cuda", dtype=torch.float64) / ht_dim**0.5
    zs = (h @ w.T).requires_grad_()
    ref = distill_loss_per_token(zs, ht @ wt.T, "jsd", beta=0.5, temperature=1.0).mean()
    ref_gz = torch.autograd.grad(ref, zs)[0]
    ref_gh, ref_gw = ref_gz @ w, ref_gz.T @ h
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    loss = fused_linear_distill_loss(h32, w32, ht.float(), wt.float(), "jsd")
    (2.5 * loss).backward(retain_graph=True)
    assert _rel(h32.grad, 2.5 * ref_gh.float()) <= 1e-4 and _rel(w32.grad, 2.5 * ref_gw.float()) <= 1e-4
    loss.backward()
    assert _rel(h32.grad, 3.5 * ref_gh.float()) <= 1e-4 and _rel(w32.grad, 3.5 * ref_gw.float()) <= 1e-4
    loss = fused_linear_distill_loss(h32, w32, ht.float(), wt.float(), "jsd")
    (0.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="received the gradient 0"):
        loss.backward()
