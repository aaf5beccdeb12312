"""``distill_loss`` on vocab-parallel shards (gloo, 2 and 4 processes) against the float64 reference.

Each rank holds columns [offset, offset + V_r) of the student and teacher logits, including
uneven splits (V = 37 as 19/18 and 10/10/10/7, where only per-token statistics cross ranks), and
calls ``distill_loss(..., tp_group=...)`` then ``backward()`` on its (replicated) loss. Checked:

* every rank returns the same loss (bitwise) and per-token losses, equal to the single-process
  float64 reference of DESIGN.md "Losses" (tests/unit/test_losses_reference.py) within the same
  float32 roundoff bounds as the single-process tests;
* the concatenation of the per-rank student gradients equals the full reference gradient (each
  shard = the matching columns), which checks the backward conventions of the all-reduces
  (sum of gradients through the sum-exp statistic, identity through the replicated loss);
* teacher shards get no gradient; masked tokens get zero gradient; a fully masked batch gives 0;
* all kinds (forward_kl, reverse_kl, jsd with beta in {0, 0.1, 0.5, 0.9, 1}), temperatures 0.5
  and 2, with masks; float64 inputs to 1e-10; bf16 inputs;
* with 4 ranks, two TP=2 groups ([0, 1], [2, 3]) working on different data at once: the loss
  uses ``tp_group`` and not the world.

One process group is spawned per world size and runs every case (about 4 s each).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from megatron_distill.losses import distill_loss, distill_loss_per_token
from tests._dist_utils import run_distributed
from tests.unit.test_losses_reference import (
    F64_TOL,
    KIND_BETAS,
    KIND_IDS,
    assert_grad_close,
    check_f32,
    make_logits,
    make_mask,
    run_ref,
)

SPLITS = {2: [(19, 18), (32, 32)], 4: [(10, 10, 10, 7), (16, 16, 16, 16)]}
SUBGROUPS = [[0, 1], [2, 3]]  # with 4 ranks: two TP=2 groups side by side


@dataclass
class Case:
    """One loss evaluation: full-vocabulary inputs and how the vocabulary is split over ranks."""

    name: str
    kind: str
    beta: float
    tau: float
    splits: tuple[int, ...]
    student: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor | None


def _case(name, kind, beta, tau, splits, seed, dtype=torch.float32, token_shape=(2, 5), mask="random"):
    shape = (*token_shape, sum(splits))
    if mask == "random":
        m = make_mask(token_shape, seed + 2)
    elif mask == "none":
        m = None
    else:  # "all": every token masked
        m = torch.zeros(token_shape, dtype=torch.bool)
    student, teacher = make_logits(shape, seed, dtype), make_logits(shape, seed + 1, dtype)
    return Case(name, kind, beta, tau, splits, student, teacher, m)


def build_cases(world: int) -> list[Case]:
    cases = []
    for (kind, beta), kid in zip(KIND_BETAS, KIND_IDS, strict=True):
        for tau in (0.5, 2.0):
            for splits in SPLITS[world]:
                name = f"{kid}/tau{tau}/" + "-".join(map(str, splits))
                cases.append(_case(name, kind, beta, tau, splits, seed=100 + len(cases)))
        uneven = SPLITS[world][0]
        cases += [
            _case(f"{kid}/float64", kind, beta, 1.5, uneven, seed=300, dtype=torch.float64),
            _case(f"{kid}/bf16", kind, beta, 0.5, uneven, seed=400, dtype=torch.bfloat16),
            _case(f"{kid}/T-V-nomask", kind, beta, 2.0, uneven, seed=500, token_shape=(7,), mask="none"),
            _case(f"{kid}/all-masked", kind, beta, 0.5, uneven, seed=600, mask="all"),
        ]
    return cases


def build_subgroup_cases() -> list[Case]:
    """One case per TP=2 subgroup of a 4-rank world (different data in each)."""
    return [
        _case(f"group{g}/jsd0.3", "jsd", 0.3, 0.7, (20, 17), seed=700 + 10 * g, token_shape=(3, 4))
        for g in range(len(SUBGROUPS))
    ]


CASES = {world: build_cases(world) for world in SPLITS}
SUBGROUP_CASES = build_subgroup_cases()


# ----------------------------------------------------------------------------- worker


def _run_shard(case: Case, tp_rank: int, group) -> dict:
    lo = sum(case.splits[:tp_rank])
    hi = lo + case.splits[tp_rank]
    student = case.student[..., lo:hi].clone().requires_grad_(True)
    teacher = case.teacher[..., lo:hi].clone().requires_grad_(True)
    loss = distill_loss(
        student, teacher, case.kind, beta=case.beta, temperature=case.tau, loss_mask=case.mask, tp_group=group
    )
    loss.backward()
    with torch.no_grad():
        per_token = distill_loss_per_token(
            student, teacher, case.kind, beta=case.beta, temperature=case.tau, tp_group=group
        )
    return {
        "loss": loss.detach(),
        "per_token": per_token,
        "grad": student.grad,
        "teacher_grad_is_none": teacher.grad is None,
    }


def _tp_worker(cases: list[Case], subgroup_cases: list[Case] | None) -> dict[str, dict]:
    rank = dist.get_rank()
    out = {case.name: _run_shard(case, rank, dist.group.WORLD) for case in cases}
    if subgroup_cases:
        groups = [dist.new_group(ranks) for ranks in SUBGROUPS]  # every rank creates every group
        g = next(i for i, ranks in enumerate(SUBGROUPS) if rank in ranks)
        out[subgroup_cases[g].name] = _run_shard(subgroup_cases[g], SUBGROUPS[g].index(rank), groups[g])
    return out


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tp_results():
    """world size -> per-rank result dicts; each world is spawned once, on first use."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            subgroup_cases = SUBGROUP_CASES if world == 4 else None
            cache[world] = run_distributed(_tp_worker, world, CASES[world], subgroup_cases, timeout=120)
        return cache[world]

    return get


def check_case(case: Case, per_rank: list[dict]) -> None:
    for r, res in enumerate(per_rank):
        assert res["teacher_grad_is_none"], f"rank {r}: the teacher shard received a gradient"
        assert torch.equal(res["loss"], per_rank[0]["loss"]), f"rank {r}: loss differs from rank 0"
        assert torch.equal(res["per_token"], per_rank[0]["per_token"]), f"rank {r}: per-token losses differ"
        assert res["grad"].shape[-1] == case.splits[r] and res["grad"].dtype == case.student.dtype
    loss, per_token = per_rank[0]["loss"], per_rank[0]["per_token"]
    grad = torch.cat([res["grad"] for res in per_rank], dim=-1)
    ref = run_ref(case.student, case.teacher, case.kind, case.beta, case.tau, case.mask)
    if case.mask is not None and not case.mask.any():
        assert loss.item() == 0.0 and not grad.any()
    if case.student.dtype == torch.float64:
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref[0], **F64_TOL)
        torch.testing.assert_close(per_token, ref[1], **F64_TOL)
        assert_grad_close(grad, ref[2], case.mask, case.tau, atol=1e-10, rtol=1e-10)
    else:
        assert loss.dtype == torch.float32
        rounding = 2.0**-8 if case.student.dtype == torch.bfloat16 else 0.0
        check_f32(case.student, case.teacher, case.tau, case.mask, (loss, per_token, grad), ref, rounding)


@pytest.mark.parametrize(
    ("world", "name"),
    [(w, c.name) for w in CASES for c in CASES[w]],
    ids=[f"tp{w}/{c.name}" for w in CASES for c in CASES[w]],
)
def test_tp_matches_float64_reference(tp_results, world, name):
    case = next(c for c in CASES[world] if c.name == name)
    per_rank = [res[name] for res in tp_results(world)]
    check_case(case, per_rank)


@pytest.mark.parametrize("g", range(len(SUBGROUPS)))
def test_tp_subgroups_of_a_larger_world(tp_results, g):
    case = SUBGROUP_CASES[g]
    results = tp_results(4)
    check_case(case, [results[r][case.name] for r in SUBGROUPS[g]])
