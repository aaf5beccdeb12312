"""``distill_loss`` (single process, ``tp_group=None``) against float64 references of the formulas.

What is checked, for ``forward_kl``, ``reverse_kl`` and ``jsd`` (beta in {0, 0.1, 0.5, 0.9, 1}):

* the loss, the per-token losses and the gradient wrt the student logits match a float64
  reference written here from DESIGN.md "Losses" (full-vocabulary softmax of z / tau, no tau^2,
  sum over the vocabulary, mean over unmasked tokens; gradients by float64 autograd), on logits
  whose rows mix scales 0.1 .. 30 with a few -1e4 entries, shapes [b, s, V] and [T, V], masks
  with fully masked rows, temperatures {0.5, 1, 2};
* the teacher never receives a gradient; masked tokens get exactly zero gradient; a fully
  masked batch gives loss 0 and gradient 0;
* float64 inputs are computed in float64 (tolerance 1e-10), bf16 inputs are upcast (loss as
  accurate as for float32 inputs, gradient returned in bf16);
* jsd at beta = 0 / 1 is bitwise forward_kl / reverse_kl; jsd / beta -> forward_kl as beta -> 0
  and jsd / (1 - beta) -> reverse_kl as beta -> 1; jsd is symmetric under (beta, S, T) ->
  (1 - beta, T, S) and bounded by the binary entropy of beta;
* the loss and its gradient match TRL's ``GKDTrainer.generalized_jsd_loss`` (re-implemented
  below) with labels = -100 on masked tokens;
* bad arguments raise ``ValueError``.

Float32 tolerances (inputs float32 or bf16; the implementation computes in float32, unit
roundoff u = 2^-24). They follow from the conditioning of the computation, per token, with
C = 8 (the observed worst case over these inputs is C ~ 1.5 for losses and ~ 3 for gradients):

* Each float32 log-probability log p_v = z_v / tau - max - log sum exp carries an absolute error
  of a few u * (M + log V), M = max |z / tau| over the token's ordinary entries. The per-token
  loss sum_v p_v d_v (d_v a log-ratio) then errs by about u (M + log V) (1 + sum_v p_v |d_v|):
  bound C u (M + log V) (1 + |ref|). A plain rtol would be wrong both ways: near-uniform tokens
  have losses ~1e-3 that are differences of log-probs ~ log V (relative error ~1e-4 is float32's
  best there), while the -1e4 entries give terms ~ p * 1e4 / tau whose error is relative u
  (they are left out of M). The mean loss gets the masked mean of the token bounds.
* Gradients are compared per token in units of d(token loss) / d(z / tau) (the reference
  gradient times N_tokens * tau). Reverse KL and JSD gradients p_S (d_v - loss) subtract
  log-ratios as large as 1e4 / tau, so here M runs over all entries: |err| <= C u (M + log V)
  (1 + max_v |ref_v|). bf16 gradients are additionally rounded to 8 bits: + 2^-8 max_v |ref_v|.
* float64 inputs compute in float64: 1e-10 absolute and relative (observed: ~1e-15 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_distill.losses import distill_loss, distill_loss_per_token

KIND_BETAS = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 1.0),
]
KIND_IDS = [k if k != "jsd" else f"jsd{b}" for k, b in KIND_BETAS]
TEMPERATURES = [0.5, 1.0, 2.0]
SHAPES = {"bsv": (3, 6, 37), "tv": (20, 512)}

U32 = 2.0**-24  # float32 unit roundoff
C_ROUND = 8.0  # safety factor on the roundoff model (see the module docstring)
EXTREME = -1e4  # the "very negative" logit planted in some rows
F64_TOL = {"rtol": 1e-10, "atol": 1e-10}


# ----------------------------------------------------------------------------- references


def ref_per_token(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float, tau: float):
    """Float64 per-token divergence straight from DESIGN.md "Losses" (full vocab on the last dim)."""
    log_ps = torch.log_softmax(student.double() / tau, dim=-1)
    log_pt = torch.log_softmax(teacher.double() / tau, dim=-1)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (p_t * (log_pt - log_ps)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (p_s * (log_ps - log_pt)).sum(-1)
    # log M, M = beta p_T + (1 - beta) p_S, in log space so that underflowed p's stay finite.
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1.0 - beta))
    kl_t_m = (p_t * (log_pt - log_m)).sum(-1)
    kl_s_m = (p_s * (log_ps - log_m)).sum(-1)
    return beta * kl_t_m + (1.0 - beta) * kl_s_m


def ref_masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    m = mask.double()
    if m.sum() == 0:
        return (per_token * m).sum()
    return (per_token * m).sum() / m.sum()


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    """TRL ``GKDTrainer.generalized_jsd_loss`` (reduction "batchmean", labels given), re-typed."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    mask = labels != -100
    jsd = jsd[mask]
    return jsd.sum() / mask.sum()


# ----------------------------------------------------------------------------- inputs


def make_logits(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random logits whose rows have scales 0.1, 1, 5 or 30, with a few entries at -1e4."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = x.reshape(-1, shape[-1])
    scales = torch.tensor([0.1, 1.0, 5.0, 30.0], dtype=torch.float64)
    rows *= scales[torch.arange(rows.shape[0]) % 4].unsqueeze(-1)
    for r in range(0, rows.shape[0], 3):
        cols = torch.randint(0, shape[-1], (3,), generator=g)
        rows[r, cols] = -1e4
    return x.to(dtype)


def make_mask(token_shape, seed: int) -> torch.Tensor:
    """Bool mask with ~25% masked tokens and the first row (batch entry / token) fully masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(token_shape, generator=g) > 0.25
    mask[0] = False
    return mask


def run_impl(student, teacher, kind, beta, tau, mask):
    """Loss, per-token losses and student gradient from the implementation (teacher gets grad on)."""
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = distill_loss(s, t, kind, beta=beta, temperature=tau, loss_mask=mask)
    loss.backward()
    assert t.grad is None, "the teacher must receive no gradient"
    with torch.no_grad():
        per_token = distill_loss_per_token(student, teacher, kind, beta=beta, temperature=tau)
    return loss, per_token, s.grad


def run_ref(student, teacher, kind, beta, tau, mask):
    s = student.detach().double().requires_grad_(True)
    per_token = ref_per_token(s, teacher.detach().double(), kind, beta, tau)
    loss = ref_masked_mean(per_token, mask)
    loss.backward()
    return loss.detach(), per_token.detach(), s.grad


def log_scale(student, teacher, tau, *, all_entries: bool) -> torch.Tensor:
    """Per token, max |z / tau| over the student's and teacher's entries, plus log V.

    ``all_entries=False`` leaves out the planted -1e4 entries (see the module docstring)."""
    z = torch.cat([student, teacher], dim=-1).double()
    scaled = z.abs() / tau
    if not all_entries:
        scaled = torch.where(z > EXTREME / 2, scaled, 0.0)
    return scaled.amax(-1) + math.log(student.shape[-1])


def assert_within(actual, ref, bound, what: str) -> None:
    """Elementwise |actual - ref| <= bound, with the worst offender in the message."""
    err = (actual.double() - ref).abs()
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        i = int(torch.argmax(torch.nan_to_num(err / bound, nan=math.inf)))
        flat = lambda t: t.reshape(-1)[i] if t.dim() else t
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} outside the bound; worst (flat index {i}): "
            f"|{float(flat(actual)):.9g} - {float(flat(ref)):.9g}| = {float(flat(err)):.3e} "
            f"> {float(flat(bound.expand_as(err))):.3e}"
        )


def f32_loss_bounds(student, teacher, tau, ref_tok, mask):
    """(per-token bound, mean-loss bound) for float32 arithmetic, from the roundoff model."""
    m = log_scale(student, teacher, tau, all_entries=False)
    tok_bound = C_ROUND * U32 * m * (1.0 + ref_tok.abs())
    w = torch.ones_like(ref_tok) if mask is None else mask.double()
    loss_bound = (tok_bound * w).sum() / w.sum().clamp(min=1.0) + C_ROUND * U32 * ref_loss_scale(ref_tok, w)
    return tok_bound, loss_bound


def ref_loss_scale(ref_tok, w):
    return (ref_tok.abs() * w).sum() / w.sum().clamp(min=1.0)


def assert_grad_close(grad, ref_grad, mask, tau, *, atol, rtol) -> None:
    """Per token, in units of d(token loss)/d(z/tau): max_v |err| <= atol + rtol * max_v |ref|.

    ``atol`` and ``rtol`` are floats or per-token tensors. Masked tokens must get exactly 0."""
    n = grad[..., 0].numel() if mask is None else int(mask.sum())
    scale = max(n, 1) * tau
    g = grad.double().reshape(-1, grad.shape[-1]) * scale
    r = ref_grad.reshape(-1, ref_grad.shape[-1]) * scale
    atol = torch.as_tensor(atol, dtype=torch.float64).reshape(-1)
    rtol = torch.as_tensor(rtol, dtype=torch.float64).reshape(-1)
    row_err = (g - r).abs().amax(-1)
    row_max = r.abs().amax(-1)
    bound = atol + rtol * row_max
    bad = ~(row_err <= bound)  # also catches NaN
    if bad.any():
        i = int(torch.argmax(torch.nan_to_num(row_err / bound, nan=math.inf)))
        raise AssertionError(
            f"student grad: {int(bad.sum())} of {bad.numel()} tokens outside the bound; worst, token {i}: "
            f"max_v |grad - ref| = {float(row_err[i]):.3e} > {float(bound[i]):.3e} "
            f"(max_v |ref| = {float(row_max[i]):.3e}; units d(token loss)/d(z/tau))"
        )
    if mask is not None:
        masked = ~mask.reshape(-1).bool()
        assert bool((grad.reshape(-1, grad.shape[-1])[masked] == 0).all()), "masked tokens must get zero grad"


def check_f32(student, teacher, tau, mask, impl, ref, grad_rounding: float = 0.0) -> None:
    """Loss, per-token losses and gradient of a float32 computation against the float64 reference."""
    loss, tok, grad = impl
    ref_loss, ref_tok, ref_grad = ref
    tok_bound, loss_bound = f32_loss_bounds(student, teacher, tau, ref_tok, mask)
    assert_within(tok, ref_tok, tok_bound, "per-token loss")
    assert_within(loss, ref_loss, loss_bound, "loss")
    k = C_ROUND * U32 * log_scale(student, teacher, tau, all_entries=True)
    assert_grad_close(grad, ref_grad, mask, tau, atol=k, rtol=k + grad_rounding)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS, ids=KIND_IDS)
def test_float32_matches_float64_reference(kind, beta, tau, shape_name):
    shape = SHAPES[shape_name]
    student = make_logits(shape, seed=1)
    teacher = make_logits(shape, seed=2)
    mask = make_mask(shape[:-1], seed=3)
    loss, per_token, grad = run_impl(student, teacher, kind, beta, tau, mask)
    ref_loss, ref_tok, ref_grad = run_ref(student, teacher, kind, beta, tau, mask)

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert per_token.dtype == torch.float32 and per_token.shape == shape[:-1]
    check_f32(student, teacher, tau, mask, (loss, per_token, grad), (ref_loss, ref_tok, ref_grad))


@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS, ids=KIND_IDS)
def test_no_mask_is_mean_over_all_tokens(kind, beta):
    student, teacher = make_logits((4, 5, 33), seed=4), make_logits((4, 5, 33), seed=5)
    impl = run_impl(student, teacher, kind, beta, 1.5, None)
    check_f32(student, teacher, 1.5, None, impl, run_ref(student, teacher, kind, beta, 1.5, None))
    loss = impl[0]
    ones = torch.ones(4, 5, dtype=torch.bool)
    assert torch.equal(distill_loss(student, teacher, kind, beta=beta, temperature=1.5, loss_mask=ones), loss)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS, ids=KIND_IDS)
def test_fully_masked_batch_gives_zero_loss_and_grad(kind, beta, mask_dtype):
    student, teacher = make_logits((2, 3, 17), seed=6), make_logits((2, 3, 17), seed=7)
    s = student.clone().requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=mask_dtype)
    loss = distill_loss(s, teacher, kind, beta=beta, temperature=0.5, loss_mask=mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS, ids=KIND_IDS)
def test_float64_inputs_are_exact_to_1e10(kind, beta, tau):
    shape = (3, 7, 41)
    student = make_logits(shape, seed=8, dtype=torch.float64)
    teacher = make_logits(shape, seed=9, dtype=torch.float64)
    mask = make_mask(shape[:-1], seed=10)
    loss, per_token, grad = run_impl(student, teacher, kind, beta, tau, mask)
    ref_loss, ref_tok, ref_grad = run_ref(student, teacher, kind, beta, tau, mask)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(per_token, ref_tok, **F64_TOL)
    torch.testing.assert_close(loss, ref_loss, **F64_TOL)
    assert_grad_close(grad, ref_grad, mask, tau, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS, ids=KIND_IDS)
def test_bf16_inputs(kind, beta, tau):
    """bf16 logits are upcast exactly, so the loss is as accurate as for float32 inputs against
    the reference evaluated at the same (bf16) values; the gradient comes back in bf16, i.e. the
    float32 gradient rounded to 8 significant bits (relative error <= 2^-9 per entry)."""
    shape = (2, 9, 64)
    student = make_logits(shape, seed=11, dtype=torch.bfloat16)
    teacher = make_logits(shape, seed=12, dtype=torch.bfloat16)
    mask = make_mask(shape[:-1], seed=13)
    loss, per_token, grad = run_impl(student, teacher, kind, beta, tau, mask)
    ref_loss, ref_tok, ref_grad = run_ref(student, teacher, kind, beta, tau, mask)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    check_f32(student, teacher, tau, mask, (loss, per_token, grad), (ref_loss, ref_tok, ref_grad), 2.0**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jsd_endpoints_are_exactly_the_kls(dtype):
    student, teacher = make_logits((4, 6, 29), 14, dtype), make_logits((4, 6, 29), 15, dtype)
    mask = make_mask((4, 6), seed=16)
    for beta, kind in [(0.0, "forward_kl"), (1.0, "reverse_kl")]:
        jsd_loss, jsd_tok, jsd_grad = run_impl(student, teacher, "jsd", beta, 1.3, mask)
        kl_loss, kl_tok, kl_grad = run_impl(student, teacher, kind, beta, 1.3, mask)
        assert torch.equal(jsd_loss, kl_loss) and torch.equal(jsd_tok, kl_tok), (beta, kind)
        assert torch.equal(jsd_grad, kl_grad), (beta, kind)


def chi2(p_log, q_log):
    """chi^2(p || q) = sum_v p^2 / q - 1 per token, from float64 log-probabilities."""
    return torch.exp(2 * p_log - q_log).sum(-1) - 1.0


def test_jsd_small_beta_limits_are_scaled_kls():
    """With r = p_T / p_S - 1: KL(p_T||M) = KL(p_T||p_S) - sum p_T log(1 + beta r) and
    KL(p_S||M) = -sum p_S log(1 + beta r) = beta^2 chi2(p_T||p_S) / 2 + O(beta^3) (sum p_S r = 0),
    so JSD_beta / beta = forward_kl - beta chi2(p_T||p_S) / 2 + O(beta^2). By the symmetry
    (beta, S, T) -> (1 - beta, T, S), JSD_{1-eps} / eps = reverse_kl - eps chi2(p_S||p_T) / 2 + ...
    The expansion needs beta * chi2 << 1, hence moderate logits (peaked ones have chi2 ~ 1e6).
    Float64 inputs at beta = 1e-4; float32 at 1e-3 (at 1e-4 float32 loses ~5% to cancellation:
    KL(p_S||M) ~ 1e-8 is a sum of terms p_S (log p_S - log M) ~ 1e-4 with roundoff ~1e-7)."""
    g = torch.Generator().manual_seed(17)
    student = torch.randn(5, 7, 31, generator=g, dtype=torch.float64) * 0.5
    teacher = torch.randn(5, 7, 31, generator=g, dtype=torch.float64) * 0.5
    for tau in (0.5, 1.0, 2.0):
        log_ps, log_pt = torch.log_softmax(student / tau, -1), torch.log_softmax(teacher / tau, -1)
        for eps, dtype in [(1e-4, torch.float64), (1e-3, torch.float32)]:
            s, t = student.to(dtype), teacher.to(dtype)
            fkl = distill_loss_per_token(s, t, "forward_kl", temperature=tau).double()
            rkl = distill_loss_per_token(s, t, "reverse_kl", temperature=tau).double()
            jsd0 = distill_loss_per_token(s, t, "jsd", beta=eps, temperature=tau).double() / eps
            jsd1 = distill_loss_per_token(s, t, "jsd", beta=1 - eps, temperature=tau).double() / eps
            # First order: the scaled limits themselves.
            torch.testing.assert_close(jsd0, fkl, rtol=1e-2, atol=0)
            torch.testing.assert_close(jsd1, rkl, rtol=1e-2, atol=0)
            if dtype == torch.float64:
                # Second order (truncation O(beta^2) ~ 1e-6 relative here): this pins the
                # convention that beta weights p_T in M.
                torch.testing.assert_close(jsd0, fkl - eps / 2 * chi2(log_pt, log_ps), rtol=1e-5, atol=0)
                torch.testing.assert_close(jsd1, rkl - eps / 2 * chi2(log_ps, log_pt), rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.77])
def test_jsd_symmetry_and_entropy_bound(beta):
    student, teacher = make_logits((3, 4, 23), 19), make_logits((3, 4, 23), 20)
    a = distill_loss_per_token(student, teacher, "jsd", beta=beta, temperature=0.7)
    b = distill_loss_per_token(teacher, student, "jsd", beta=1 - beta, temperature=0.7)
    tok_bound, _ = f32_loss_bounds(student, teacher, 0.7, a.double(), None)
    assert_within(a, b.double(), 2 * tok_bound, "jsd(beta, S, T) vs jsd(1 - beta, T, S)")
    h_beta = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert bool((a >= -1e-6).all()) and bool((a <= h_beta + 1e-6).all())


@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS, ids=KIND_IDS)
def test_identical_distributions_give_zero(kind, beta):
    logits = make_logits((3, 4, 19), seed=21)
    s = logits.clone().requires_grad_(True)
    loss = distill_loss(s, logits, kind, beta=beta, temperature=0.5)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert s.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_matches_trl_generalized_jsd_loss(beta, tau):
    """TRL's GKD loss (summed over the vocab, mean over labels != -100) is our ``jsd``."""
    shape = (2, 8, 45)
    student = make_logits(shape, seed=22, dtype=torch.float64)
    teacher = make_logits(shape, seed=23, dtype=torch.float64)
    mask = make_mask(shape[:-1], seed=24)
    labels = torch.where(mask, torch.arange(16).reshape(2, 8) % shape[-1], -100)
    # TRL with labels divides by the number of unmasked tokens: fully masked rows are fine, a
    # fully masked batch (0 / 0) is not, so mask[0] = False leaves the second row counted.
    s_trl = student.clone().requires_grad_(True)
    trl = trl_generalized_jsd_loss(s_trl, teacher, labels, beta, tau)
    trl.backward()
    loss, _, grad = run_impl(student, teacher, "jsd", beta, tau, mask)
    torch.testing.assert_close(loss, trl, **F64_TOL)
    assert_grad_close(grad, s_trl.grad, mask, tau, atol=1e-10, rtol=1e-10)
    # And float32 inputs agree with TRL run in float64 to the float32 tolerance.
    s32, t32 = student.float(), teacher.float()
    loss32, _, _ = run_impl(s32, t32, "jsd", beta, tau, mask)
    trl32_in = trl_generalized_jsd_loss(s32.double(), t32.double(), labels, beta, tau)
    ref_tok = ref_per_token(s32, t32, "jsd", beta, tau)
    _, loss_bound = f32_loss_bounds(s32, t32, tau, ref_tok, mask)
    assert_within(loss32, trl32_in, loss_bound, "float32 loss vs TRL in float64")


def test_bad_arguments_raise():
    s, t = torch.zeros(2, 5), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="kind"):
        distill_loss(s, t, "kl")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(s, t, "jsd", beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, "forward_kl", temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(s, torch.zeros(2, 6), "forward_kl")
    with pytest.raises(ValueError, match="loss_mask"):
        distill_loss(s, t, "forward_kl", loss_mask=torch.ones(3))
