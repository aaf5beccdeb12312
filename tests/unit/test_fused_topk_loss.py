"""``fused_linear_topk_distill_loss`` against the top-k reference ``topk_distill_loss`` (the contract).

The reference is evaluated in float64 on the explicit logits ``h @ W.T`` computed in the
inputs' dtype; its gradients wrt ``h`` / ``W`` come from the float64 logits gradient by the
chain rule. Tolerances (norm-wise relative) are those of tests/unit/test_fused_loss.py, which
explains them: fp32 1e-5 (jsd gradients 5e-5), bf16 loss 1e-4 and gradients 1.5e-2.

Checked: every kind (forward_kl with / without renormalize, reverse_kl, jsd at beta 0.3 / 0 / 1),
fp32 and bf16, masks with chunks that do not divide the unmasked rows, ``reduction="sum"``,
``[s, b, h]`` leading dims, K = V against the dense fused loss, a fully masked batch, no gradient
to the teacher tensors and scaling by the incoming gradient; and at TP = 2 (run_distributed,
gloo) with uneven vocab shards, with and without the sequence-parallel layout (hidden states
split over the tokens, gradient reduce-scattered back), every rank's loss and gradients equal
the single-process reference's.
"""

from __future__ import annotations

import pytest
import torch

from megatron_distill.losses import fused_linear_distill_loss, fused_linear_topk_distill_loss, topk_distill_loss
from tests._dist_utils import run_distributed

TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.bfloat16: dict(loss=1e-4, grad=1.5e-2)}
KINDS = [("forward_kl", 0.5, False), ("forward_kl", 0.5, True), ("reverse_kl", 0.5, False),
         ("jsd", 0.3, False), ("jsd", 0.0, False), ("jsd", 1.0, False)]
KIND_IDS = ["fkl", "fkl-renorm", "rkl", "jsd0.3", "jsd0", "jsd1"]


def _inputs(t, h, v, k, dtype, seed=0, tau=1.0):
    """Student hidden [t, h] and weight [v, h] in ``dtype``; the teacher's top-k [t, k] (float32)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(t, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (4.0 / h**0.5)
    zt = torch.randn(t, v, generator=g, dtype=torch.float64) * 3.0
    logp, ids = torch.log_softmax(zt / tau, dim=-1).topk(k, dim=-1)
    return hs.to(dtype), w.to(dtype), ids, logp.float()


def _reference(h, w, ids, logp, kind, beta, tau, renorm, mask, reduction):
    zs = (h @ w.T).double().requires_grad_()
    loss = topk_distill_loss(zs, ids, logp, kind, beta=beta, temperature=tau, renormalize=renorm, loss_mask=mask)
    if reduction == "sum":
        loss = loss * (mask.sum().clamp(min=1) if mask is not None else zs.shape[0])
    loss.backward()
    return loss.detach(), zs.grad @ w.double(), zs.grad.T @ h.double()


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _tol(dtype, kind, beta):
    if dtype == torch.float32 and kind == "jsd" and 0.0 < beta < 1.0:
        return 5e-5
    return TOL[dtype]["grad"]


def _check(h, w, ids, logp, kind, beta, tau, renorm, mask, reduction, **kw):
    dtype = h.dtype
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_topk_distill_loss(h1, w1, ids, logp, kind, beta=beta, temperature=tau, renormalize=renorm,
                                          loss_mask=mask, reduction=reduction, **kw)
    loss.backward()
    ref_loss, ref_gh, ref_gw = _reference(h, w, ids, logp, kind, beta, tau, renorm, mask, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= TOL[dtype]["loss"] * abs(ref_loss.item())
    assert h1.grad.dtype == dtype and w1.grad.dtype == dtype
    assert _rel(h1.grad, ref_gh) <= _tol(dtype, kind, beta)
    assert _rel(w1.grad, ref_gw) <= _tol(dtype, kind, beta)
    return h1.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "beta", "renorm"), KINDS, ids=KIND_IDS)
def test_matches_topk_reference(kind, beta, renorm, dtype):
    h, w, ids, logp = _inputs(29, 16, 301, 12, dtype, seed=1, tau=1.7)
    mask = (torch.rand(29, generator=torch.Generator().manual_seed(2)) > 0.35).float()
    # chunks of 8 (not dividing the unmasked rows), mean; then one chunk, sum, tau < 1
    gh = _check(h, w, ids, logp, kind, beta, 1.7, renorm, mask, "mean", chunk_tokens=8)
    assert gh[mask == 0].abs().max() == 0
    h, w, ids, logp = _inputs(29, 16, 301, 12, dtype, seed=3, tau=0.6)
    _check(h, w, ids, logp, kind, beta, 0.6, renorm, None, "sum")


@pytest.mark.parametrize(("kind", "beta", "renorm"), KINDS, ids=KIND_IDS)
def test_k_equals_v_is_the_dense_fused_loss(kind, beta, renorm):
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(13, 8, generator=g), torch.randn(50, 8, generator=g)
    ht, wt = torch.randn(13, 10, generator=g), torch.randn(50, 10, generator=g)
    logp = torch.log_softmax((ht @ wt.T).double() / 1.3, dim=-1)
    ids = torch.rand(13, 50, generator=g).argsort(dim=-1)
    dense = fused_linear_distill_loss(h, w, ht, wt, kind, beta=beta, temperature=1.3, impl="torch")
    top = fused_linear_topk_distill_loss(h, w, ids, logp.gather(-1, ids).float(), kind, beta=beta,
                                         temperature=1.3, renormalize=renorm, chunk_tokens=5)
    assert abs(top.item() - dense.item()) <= 1e-5 * abs(dense.item())


def test_leading_dims_all_masked_teacher_no_grad_and_grad_output():
    h, w, ids, logp = _inputs(24, 8, 77, 5, torch.float32, seed=5)
    mask = torch.ones(24)
    mask[:12] = 0
    ref = _reference(h, w, ids, logp, "jsd", 0.7, 1.3, False, mask, "mean")
    h3, w1 = h.view(6, 4, 8).clone().requires_grad_(), w.clone().requires_grad_()
    lp = logp.view(6, 4, 5).clone().requires_grad_()
    loss = fused_linear_topk_distill_loss(h3, w1, ids.view(6, 4, 5), lp, "jsd", beta=0.7, temperature=1.3,
                                          loss_mask=mask.view(6, 4), chunk_tokens=5)
    (2.5 * loss).backward()
    assert lp.grad is None
    assert abs(loss.item() - ref[0].item()) <= 1e-5 * ref[0].item()
    assert h3.grad.shape == (6, 4, 8) and h3.grad.view(24, 8)[:12].abs().max() == 0
    assert _rel(h3.grad.view(24, 8), 2.5 * ref[1]) <= 5e-5 and _rel(w1.grad, 2.5 * ref[2]) <= 5e-5
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    zero = fused_linear_topk_distill_loss(h1, w1, ids, logp, "forward_kl", loss_mask=torch.zeros(24))
    zero.backward()
    assert zero.item() == 0.0 and h1.grad.abs().max() == 0 and w1.grad.abs().max() == 0


def test_rejects_bad_arguments():
    h, w, ids, logp = _inputs(4, 8, 16, 3, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_topk_distill_loss(h, w, ids, logp, "jsd", reduction="none")
    with pytest.raises(ValueError, match="kind"):
        fused_linear_topk_distill_loss(h, w, ids, logp, "kl")
    with pytest.raises(ValueError, match="tokens"):
        fused_linear_topk_distill_loss(h, w, ids[:3], logp[:3], "jsd")
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_topk_distill_loss(h, w[:, :4], ids, logp, "jsd")


# ----------------------------------------------------------------------------- TP = 2

T, H, V, K = 24, 12, 301, 10
ROWS = (160, 141)  # uneven vocab shards
TP_CASES = [  # kind, beta, renorm, tau, masked, sequence_parallel, dtype
    ("forward_kl", 0.5, False, 1.0, True, False, torch.float32),
    ("forward_kl", 0.5, True, 1.4, False, True, torch.float32),
    ("reverse_kl", 0.5, False, 0.8, True, True, torch.float32),
    ("jsd", 0.4, False, 1.2, True, True, torch.float32),
    ("jsd", 0.4, False, 1.2, True, True, torch.bfloat16),
    ("forward_kl", 0.5, False, 1.0, False, True, torch.bfloat16),
]


def _tp_inputs(i, dtype, tau):
    h, w, ids, logp = _inputs(T, H, V, K, dtype, seed=10 + i, tau=tau)
    ids[0] = torch.arange(K)  # every id of token 0 on shard 0, of token 1 on shard 1
    ids[1] = torch.arange(V - K, V)
    mask = (torch.rand(T, generator=torch.Generator().manual_seed(30 + i)) > 0.3).float()
    return h, w, ids, logp, mask


def _tp_worker():
    import torch.distributed as dist

    rank, group = dist.get_rank(), dist.group.WORLD
    start = sum(ROWS[:rank])
    out = []
    for i, (kind, beta, renorm, tau, masked, sp, dtype) in enumerate(TP_CASES):
        h, w, ids, logp, mask = _tp_inputs(i, dtype, tau)
        if sp:
            h = h[rank * T // 2 : (rank + 1) * T // 2]
        hs = h.clone().requires_grad_()
        ws = w[start : start + ROWS[rank]].clone().requires_grad_()
        loss = fused_linear_topk_distill_loss(
            hs, ws, ids, logp, kind, beta=beta, temperature=tau, renormalize=renorm,
            loss_mask=mask if masked else None, tp_group=group, vocab_start=start, sequence_parallel=sp,
            chunk_tokens=7,
        )
        loss.backward()
        out.append((loss.detach(), hs.grad, ws.grad))
    return out


def test_tp2_and_sequence_parallel_match_single_process():
    results = run_distributed(_tp_worker, 2, timeout=180)
    for i, (kind, beta, renorm, tau, masked, sp, dtype) in enumerate(TP_CASES):
        h, w, ids, logp, mask = _tp_inputs(i, dtype, tau)
        ref_loss, ref_gh, ref_gw = _reference(h, w, ids, logp, kind, beta, tau, renorm, mask if masked else None,
                                              "mean")
        for rank in range(2):
            loss, gh, gw = results[rank][i]
            case = f"rank {rank} case {TP_CASES[i]}"
            start = sum(ROWS[:rank])
            if sp:
                ref_gh_r = ref_gh[rank * T // 2 : (rank + 1) * T // 2]
            else:
                ref_gh_r = ref_gh
            assert abs(loss.item() - ref_loss.item()) <= TOL[dtype]["loss"] * abs(ref_loss.item()), case
            assert gh.shape == ref_gh_r.shape and gh.dtype == dtype, case
            assert _rel(gh, ref_gh_r) <= _tol(dtype, kind, beta), (case, _rel(gh, ref_gh_r))
            assert _rel(gw, ref_gw[start : start + ROWS[rank]]) <= _tol(dtype, kind, beta), case
