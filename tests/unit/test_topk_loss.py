"""``topk_distill_loss`` (losses/topk.py) against the dense loss and a float64 reference.

Checked, for ``forward_kl`` (with and without ``renormalize``), ``reverse_kl`` and ``jsd`` (beta
in {0, 0.3, 1}):

* K = V (every id, shuffled per position) equals the dense ``distill_loss`` on the teacher
  logits whose tempered log-softmax gave the top-k log-probs: loss and student gradient, float64
  to 1e-10, with masks and temperatures 0.5 / 1 / 2;
* K < V (the teacher's true top-k, and arbitrary ids) against ``ref_topk`` below, written from
  DESIGN.md "Losses" in float64 (gradients by float64 autograd): float64 to 1e-10, float32 and
  bf16 logits to the relative tolerances of tests/unit/test_fused_loss.py;
* masked tokens get zero gradient, a fully masked batch gives 0; ``renormalize`` does not
  change the renormalized kinds; ``jsd`` at beta = 0 / 1 is the KL of the renormalized pair;
* TP = 2 (run_distributed, gloo): vocabulary shards (even and uneven: 19 / 18 and 30 / 7), ids
  spread over both shards and rows whose ids all lie on one shard; every rank returns the
  single-process loss and its shard's columns of the single-process gradient;
* bad arguments raise ``ValueError`` naming them.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_distill.losses import distill_loss, topk_distill_loss, topk_distill_loss_per_token
from tests._dist_utils import run_distributed

KINDS = [("forward_kl", 0.5, False), ("forward_kl", 0.5, True), ("reverse_kl", 0.5, False),
         ("jsd", 0.3, False), ("jsd", 0.0, False), ("jsd", 1.0, False)]
KIND_IDS = ["fkl", "fkl-renorm", "rkl", "jsd0.3", "jsd0", "jsd1"]
F64 = dict(rtol=1e-10, atol=1e-10)


def ref_topk(student_logits, ids, teacher_logp, kind, beta, tau, renormalize):
    """Float64 per-token top-k divergence, straight from DESIGN.md "Losses" (full vocab last)."""
    log_ps = torch.log_softmax(student_logits.double() / tau, dim=-1).gather(-1, ids)
    log_pt = teacher_logp.double()
    if kind == "forward_kl":
        if renormalize:
            log_pt = log_pt - torch.logsumexp(log_pt, -1, keepdim=True)
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    # both renormalized over the K ids
    log_ps = log_ps - torch.logsumexp(log_ps, -1, keepdim=True)
    log_pt = log_pt - torch.logsumexp(log_pt, -1, keepdim=True)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    if kind == "reverse_kl" or beta == 1.0:
        return (p_s * (log_ps - log_pt)).sum(-1)
    if beta == 0.0:
        return (p_t * (log_pt - log_ps)).sum(-1)
    log_m = torch.log(beta * p_t + (1 - beta) * p_s)
    return beta * (p_t * (log_pt - log_m)).sum(-1) + (1 - beta) * (p_s * (log_ps - log_m)).sum(-1)


def masked_mean(per_token, mask):
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def logits(shape, seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def teacher_topk(teacher_logits, k, tau, seed=None):
    """The teacher's top-k (or, with ``seed``, k random distinct ids) and their log-probs."""
    logp = torch.log_softmax(teacher_logits.double() / tau, dim=-1)
    if seed is None:
        return logp.topk(k, dim=-1)[1], logp.topk(k, dim=-1)[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(logp.shape, generator=g).argsort(dim=-1)[..., :k]
    return ids, logp.gather(-1, ids)


def mask_for(token_shape, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(token_shape, generator=g) > 0.3
    m.view(-1)[0] = False
    return m


def impl(student, ids, logp, kind, beta, tau, renorm, mask, **kw):
    s = student.clone().requires_grad_(True)
    loss = topk_distill_loss(s, ids, logp, kind, beta=beta, temperature=tau, renormalize=renorm, loss_mask=mask, **kw)
    loss.backward()
    return loss.detach(), s.grad


def reference(student, ids, logp, kind, beta, tau, renorm, mask):
    s = student.detach().double().requires_grad_(True)
    loss = masked_mean(ref_topk(s, ids, logp, kind, beta, tau, renorm), mask)
    loss.backward()
    return loss.detach(), s.grad


def rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("kind", "beta", "renorm"), KINDS, ids=KIND_IDS)
def test_k_equals_v_is_the_dense_loss(kind, beta, renorm, tau):
    student, teacher = logits((3, 5, 41), 1), logits((3, 5, 41), 2)
    ids, logp = teacher_topk(teacher, 41, tau, seed=3)  # every id, shuffled
    mask = mask_for((3, 5), 4)
    loss, grad = impl(student, ids, logp, kind, beta, tau, renorm, mask)
    s = student.clone().requires_grad_(True)
    dense = distill_loss(s, teacher, kind, beta=beta, temperature=tau, loss_mask=mask)
    dense.backward()
    torch.testing.assert_close(loss, dense.detach(), **F64)
    torch.testing.assert_close(grad, s.grad, **F64)


@pytest.mark.parametrize("random_ids", [False, True], ids=["topk", "random-ids"])
@pytest.mark.parametrize(("kind", "beta", "renorm"), KINDS, ids=KIND_IDS)
def test_k_less_than_v_matches_float64_reference(kind, beta, renorm, random_ids):
    student, teacher = logits((4, 6, 53), 5), logits((4, 6, 53), 6, scale=4.0)
    ids, logp = teacher_topk(teacher, 7, 1.3, seed=7 if random_ids else None)
    mask = mask_for((4, 6), 8)
    loss, grad = impl(student, ids, logp, kind, beta, 1.3, renorm, mask)
    ref_loss, ref_grad = reference(student, ids, logp, kind, beta, 1.3, renorm, mask)
    torch.testing.assert_close(loss, ref_loss, **F64)
    torch.testing.assert_close(grad, ref_grad, **F64)
    assert (grad[~mask] == 0).all(), "masked tokens must get zero gradient"
    if kind != "forward_kl":  # the full-vocabulary normalizer cancels: gradient only at the ids
        outside = torch.ones_like(grad, dtype=torch.bool).scatter_(-1, ids, False)
        assert (grad[outside] == 0).all()
    per_token = topk_distill_loss_per_token(student, ids, logp, kind, beta=beta, temperature=1.3, renormalize=renorm)
    assert per_token.shape == (4, 6) and per_token.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "beta", "renorm"), KINDS, ids=KIND_IDS)
def test_low_precision_logits(kind, beta, renorm, dtype):
    """fp32 / bf16 logits compute in fp32: 1e-5 (loss) and 1e-5 / 5e-5 (jsd) relative (gradients,
    returned in fp32 / rounded to bf16: 1.5e-2), as tests/unit/test_fused_loss.py explains."""
    student, teacher = logits((5, 64), 9, dtype), logits((5, 64), 10, scale=4.0)
    ids, logp = teacher_topk(teacher, 9, 0.8)
    loss, grad = impl(student, ids, logp.float(), kind, beta, 0.8, renorm, None)
    ref_loss, ref_grad = reference(student, ids, logp.float(), kind, beta, 0.8, renorm, None)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    tol = 1.5e-2 if dtype == torch.bfloat16 else (5e-5 if kind == "jsd" else 1e-5)
    assert rel(grad, ref_grad) <= tol


def test_renormalized_kinds_ignore_renormalize_and_jsd_endpoints():
    student, teacher = logits((3, 4, 30), 11), logits((3, 4, 30), 12)
    ids, logp = teacher_topk(teacher, 6, 1.0)
    for kind in ("reverse_kl", "jsd"):
        a = topk_distill_loss(student, ids, logp, kind, renormalize=False)
        b = topk_distill_loss(student, ids, logp, kind, renormalize=True)
        assert torch.equal(a, b)
    rkl = topk_distill_loss(student, ids, logp, "reverse_kl")
    assert torch.equal(topk_distill_loss(student, ids, logp, "jsd", beta=1.0), rkl)
    # jsd at beta = 0: KL(p^_T || p^_S), the student renormalized too (unlike forward_kl)
    jsd0 = topk_distill_loss(student, ids, logp, "jsd", beta=0.0)
    fkl_renorm = topk_distill_loss(student, ids, logp, "forward_kl", renormalize=True)
    log_ps = torch.log_softmax(student, -1).gather(-1, ids)
    torch.testing.assert_close(jsd0, fkl_renorm + torch.logsumexp(log_ps, -1).mean(), **F64)
    # forward_kl without renormalize drops the teacher's mass outside K: smaller than renormalized
    assert topk_distill_loss(student, ids, logp, "forward_kl") < fkl_renorm


@pytest.mark.parametrize(("kind", "beta", "renorm"), KINDS, ids=KIND_IDS)
def test_fully_masked_gives_zero(kind, beta, renorm):
    student, teacher = logits((2, 3, 20), 13), logits((2, 3, 20), 14)
    ids, logp = teacher_topk(teacher, 4, 1.0)
    loss, grad = impl(student, ids, logp, kind, beta, 1.0, renorm, torch.zeros(2, 3))
    assert loss.item() == 0.0 and (grad == 0).all()


def test_bad_arguments_raise():
    s = torch.zeros(2, 10)
    ids, lp = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        topk_distill_loss(s, ids, lp, "kl")
    with pytest.raises(ValueError, match="temperature"):
        topk_distill_loss(s, ids, lp, "forward_kl", temperature=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        topk_distill_loss(s, ids, torch.zeros(2, 4), "forward_kl")
    with pytest.raises(ValueError, match="tokens"):
        topk_distill_loss(s, torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 3), "forward_kl")
    with pytest.raises(ValueError, match="integer"):
        topk_distill_loss(s, lp, lp, "forward_kl")
    with pytest.raises(ValueError, match="loss_mask"):
        topk_distill_loss(s, ids, lp, "forward_kl", loss_mask=torch.ones(3))


# ----------------------------------------------------------------------------- TP = 2

SPLITS = [(19, 18), (30, 7)]


def _tp_cases():
    """(kind, beta, renorm, tau, splits, student [2, 5, V], ids, logp, mask) per case."""
    cases = []
    for i, (kind, beta, renorm) in enumerate(KINDS):
        for j, splits in enumerate(SPLITS):
            v = sum(splits)
            student, teacher = logits((2, 5, v), 20 + 2 * i + j), logits((2, 5, v), 40 + 2 * i + j)
            tau = 0.7 if j else 1.6
            k = v if (i + j) % 4 == 0 else 6  # some cases with K = V
            ids, logp = teacher_topk(teacher, k, tau, seed=60 + i + j)
            if k < v:  # row 0: every id on shard 0; row 1: every id on shard 1
                ids[0, 0] = torch.arange(k)
                ids[0, 1] = torch.arange(v - k, v)
                logp[0, :2] = torch.log_softmax(teacher[0, :2].double() / tau, -1).gather(-1, ids[0, :2])
            cases.append((kind, beta, renorm, tau, splits, student, ids, logp, mask_for((2, 5), 80 + i)))
    return cases


def _tp_worker(cases):
    import torch.distributed as dist

    rank, group = dist.get_rank(), dist.group.WORLD
    out = []
    for kind, beta, renorm, tau, splits, student, ids, logp, mask in cases:
        start = sum(splits[:rank])
        shard = student[..., start : start + splits[rank]].clone().requires_grad_(True)
        loss = topk_distill_loss(shard, ids, logp, kind, beta=beta, temperature=tau, renormalize=renorm,
                                 loss_mask=mask, tp_group=group, vocab_start=start)
        loss.backward()
        out.append((loss.detach(), shard.grad))
    return out


def test_tp2_vocab_shards_match_single_process():
    cases = _tp_cases()
    results = run_distributed(_tp_worker, 2, cases, timeout=180)
    for c, (kind, beta, renorm, tau, splits, student, ids, logp, mask) in enumerate(cases):
        ref_loss, ref_grad = reference(student, ids, logp, kind, beta, tau, renorm, mask)
        for rank in range(2):
            loss, grad = results[rank][c]
            start = sum(splits[:rank])
            what = f"case {c} ({kind}, beta {beta}, renorm {renorm}, splits {splits}), rank {rank}"
            msg = lambda m, w=what: f"{w}: {m}"
            torch.testing.assert_close(loss, ref_loss, **F64, msg=msg)
            torch.testing.assert_close(grad, ref_grad[..., start : start + splits[rank]], **F64, msg=msg)
        assert math.isfinite(results[0][c][0].item())
