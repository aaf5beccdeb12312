"""TP=2, PP=2, TP2 x PP2, DP=2 and sequence-parallel runs equal a single-process run.

Real Megatron-Core on gloo. Every layout loads the same full student (GQA, SwiGLU, RMSNorm,
RoPE, tied embeddings) and teacher (wider, fewer layers, LayerNorm, learned positions, untied)
and trains 3 iterations on the same synthetic global batches with the JSD loss (beta 0.4,
temperature 1.5) plus cross-entropy. Checked: the losses of every iteration, the grad norms, the
first iteration's student gradients parameter by parameter (re-assembled from the TP/PP shards),
and that the teacher is frozen: bitwise unchanged, no grads, eval mode.

Tolerance: float32 everywhere. A different layout only reorders float32 sums (TP splits matmul
reductions, DP and micro-batching split the token sums), so results agree to a few float32 ulps
of accumulated rounding (observed ~1e-8 relative). We allow 1e-5 relative: two orders of
magnitude of headroom, while any real error (a missing all-reduce, a wrong shard, a token
counted twice) shows up at 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from megatron_distill.models.sharding import is_vocab_param, unshard_tensors
from tests._dist_utils import run_distributed
from tests.distributed.engine_cases import VOCAB, run_layout_worker, save_full_weights_worker

RTOL = 1e-5


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "full.pt")
    run_distributed(save_full_weights_worker, 1, path, init_process_group=False, timeout=120)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    return run_distributed(run_layout_worker, 1, weights, 1, 1, init_process_group=False, timeout=120)[0]


def _assemble_grads(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full-model gradients from every rank's (tp_rank, layout, shard) entries."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    layouts = {}
    for res in results:
        for name, (tp_rank, layout, grad) in res["grads"].items():
            shards.setdefault(name, {})[tp_rank] = grad
            layouts[name] = layout
    full = {}
    for name, by_rank in shards.items():
        ordered = [by_rank[r] for r in sorted(by_rank)]
        rows = VOCAB if is_vocab_param(name) else None
        full[name] = unshard_tensors(ordered, layouts[name], full_rows=rows)
    return full


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check_against_reference(results: list[dict], reference: dict, check_grads: bool = True) -> None:
    for res in results:
        torch.testing.assert_close(res["losses"], reference["losses"], rtol=RTOL, atol=0)
        torch.testing.assert_close(res["kd"], reference["kd"], rtol=RTOL, atol=0)
        torch.testing.assert_close(res["ce"], reference["ce"], rtol=RTOL, atol=0)
        torch.testing.assert_close(res["grad_norms"], reference["grad_norms"], rtol=RTOL, atol=0)
        assert res["tokens"] == reference["tokens"]
        assert res["teacher_unchanged"], "teacher parameters changed during training"
        assert not res["teacher_requires_grad"]
        assert not res["teacher_training_mode"]
    if not check_grads:
        return
    ref_grads = _assemble_grads([reference])
    grads = _assemble_grads(results)
    tied_copy = grads.pop("output_layer.weight", None)
    if tied_copy is not None and "output_layer.weight" not in ref_grads:
        # PP>1 with tied embeddings: the last stage's copy must carry the same (synced) grad.
        assert _rel_err(tied_copy, ref_grads["embedding.word_embeddings.weight"]) < RTOL
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.norm() > 0, f"reference grad of {name} is zero: the test would not see errors"
        err = _rel_err(grads[name], ref)
        assert err < RTOL, f"{name}: relative grad error {err:.2e}"


def test_reference_run_learns_and_is_nontrivial(reference):
    assert reference["losses"][-1] < reference["losses"][0]
    assert reference["kd"][0] > 1e-3, "teacher and student too close for the test to mean anything"


@pytest.mark.parametrize(
    "world,tp,pp,extra",
    [
        (2, 2, 1, {}),
        (2, 1, 2, {}),
        (4, 2, 2, {}),
        (2, 1, 1, {}),  # DP=2, 2 micro-batches per rank
        (2, 2, 1, {"sequence_parallel": True}),
    ],
    ids=["tp2", "pp2", "tp2xpp2", "dp2", "tp2-sequence-parallel"],
)
def test_layout_matches_single_process(weights, reference, world, tp, pp, extra):
    results = run_distributed(
        run_layout_worker, world, weights, tp, pp, init_process_group=False, timeout=240, kwargs=extra
    )
    _check_against_reference(results, reference)


def test_distributed_optimizer_dp2_matches(weights, reference):
    results = run_distributed(
        run_layout_worker, 2, weights, 1, 1, init_process_group=False, timeout=240,
        kwargs={"distributed_optimizer": True},
    )
    _check_against_reference(results, reference, check_grads=False)


@pytest.fixture(scope="module")
def reference_kd_only(weights):
    return run_distributed(
        run_layout_worker, 1, weights, 1, 1, init_process_group=False, timeout=120, kwargs={"ce_weight": 0.0}
    )[0]


@pytest.mark.parametrize(
    "world,tp,pp,extra",
    [
        (1, 1, 1, {}),
        (1, 1, 1, {"output_layer_grad_accumulation_fusion": False}),
        (2, 2, 1, {"sequence_parallel": True}),
        (2, 1, 2, {}),
    ],
    ids=["fused-tp1", "fused-tp1-no-grad-fusion", "fused-tp2-sequence-parallel", "fused-pp2"],
)
def test_fused_loss_in_engine_matches_reference(weights, reference_kd_only, world, tp, pp, extra):
    """The fused output-layer + loss path (hidden states to the loss) equals the reference path.

    By default the fused loss adds the output layer's weight gradient straight into main_grad
    (--output-layer-grad-accumulation-fusion): the tied embedding's gradient (TP1, TP2) and the
    last stage's separate copy of it (PP2) must still equal the reference's, parameter by parameter."""
    results = run_distributed(
        run_layout_worker, world, weights, tp, pp, init_process_group=False, timeout=300,
        kwargs={"ce_weight": 0.0, "impl": "fused", **extra},
    )
    _check_against_reference(results, reference_kd_only)
