"""benchmarks/quality/run.py's bookkeeping: the warm-start data rows, the paired sign test, merging runs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from tests._modules import load_file_module

_RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "run.py"


@pytest.fixture(scope="module")
def run():
    return load_file_module("quality_run", _RUN)


def test_warm_start_rows_mix_plain_own_and_near_miss_hints(run):
    rows = run.task.make_splits(8, 0, seed=2)[0]
    rng = random.Random(0)
    made = [run.warm_start_row(i, r, rng) for i, r in enumerate(rows)]
    for i, (row, out) in enumerate(zip(rows, made, strict=True)):
        if i % 2 == 0:
            assert out == {k: row[k] for k in ("prompt", "response", "reference")}
            continue
        hint, prompt, answer = out["messages"]
        assert (prompt["content"], answer["content"]) == (row["prompt"], row["response"])
        assert (hint["content"] == row["privileged_context"]) == (i % 4 == 1)


def _binomial_two_sided(gained: int, lost: int) -> float:
    """Exact two-sided binomial test of gained vs lost at p = 1/2, summed over outcomes as likely or less."""
    n = gained + lost
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[gained] * (1 + 1e-12)))


@pytest.mark.parametrize(("gained", "lost", "same"), [(0, 0, 5), (3, 1, 10), (20, 0, 3), (7, 9, 0), (30, 12, 100)])
def test_paired_change_counts_and_sign_test(run, gained, lost, same):
    before = [0] * gained + [1] * lost + [1] * same
    after = [1] * gained + [0] * lost + [1] * same
    change = run.paired_change(before, after)
    assert (change["gained"], change["lost"]) == (gained, lost)
    assert change["sign_test_p"] == pytest.approx(_binomial_two_sided(gained, lost), rel=1e-9)


def test_merge_carries_only_the_methods_this_run_lacks(run):
    earlier = {"students": {"pcsd": [{"accuracy": 0.2}], "sft": [{"accuracy": 0.5}]},
               "teacher_eval": {"accuracy": 0.9}, "engine_runs": [{"log": "a"}], "notes": ["n1"],
               "date_utc": "d", "device": "dev", "wall_seconds": 1.0}
    results = {"students": {"sft": [{"accuracy": 0.6}], "kd": [{"accuracy": 0.7}]}, "engine_runs": [{"log": "b"}],
               "notes": []}
    run.merge_students(earlier, results)
    assert results["students"] == {"sft": [{"accuracy": 0.6}], "kd": [{"accuracy": 0.7}], "pcsd": [{"accuracy": 0.2}]}
    assert results["teacher_eval"] == {"accuracy": 0.9}
    assert [r["log"] for r in results["engine_runs"]] == ["a", "b"]
    assert results["merged_from"][0]["methods"] == ["pcsd", "sft"]


def test_merge_refuses_another_warm_start(run):
    with pytest.raises(SystemExit, match="not the same warm start"):
        run.merge_check_warm_start({"warm_start": {"correct": 85, "accuracy_with_hint": 0.5}},
                                   {"warm_start": {"correct": 86, "accuracy_with_hint": 0.5}})
