"""On-policy distillation (GKD) and the RL term inside the engine (megatron_distill/onpolicy.py).

Real Megatron-Core on gloo, a tiny student (RoPE, GQA, SwiGLU, RMSNorm, tied embeddings) and a
wider teacher (learned positions, LayerNorm, untied), chat rows tokenized by the tiny local
tokenizer of tests/unit/data_fixtures.py. One single-process spawn runs the TP1 cases:

* ``--on-policy-fraction 0``: the engine loop with the on-policy wrapper gives bitwise the losses
  and grad norms of the loop without it (dropout on, so a consumed RNG draw would show);
* the built micro-batches hold exactly prompt + generated response, and the loss mask is 1 on
  exactly the labels that ``generate()``'s response_mask marks (student and --seq-kd teacher
  rollouts); dataset samples pass unchanged;
* the RL term: kd weight 0, rl weight 1, one iteration: the loss and every student gradient equal
  a hand-computed REINFORCE-with-group-baseline loss on the same tokens (rewards decoded and
  averaged per prompt by hand, plain ``log_softmax(logits / T)`` of an unwrapped copy of the
  student, autograd);
* the fused loss path (hidden states to the fused output-layer + loss) gives the reference path's
  losses and on/off-policy split, on micro-batches of one part and on micro-batches mixing both;
* the reference on-policy run (lambda 0.5, 2 rollouts per prompt, RL 0.5, JSD + CE, sampled at
  temperature 0.9 with top-k) for the layout comparison.

TP2 and PP2 (one 2-process spawn, re-initialising the parallel state between them) and TP2 x PP2
(4 processes) must generate the same tokens and give the same losses, grad norms, on/off-policy
kd, pg loss and rewards as TP1. Tolerance 1e-5 relative, as tests/distributed/
test_engine_equivalence.py: a layout only reorders float32 sums (observed ~1e-7), and the
rollouts are identical token for token (the sampling noise is keyed by seed, row and token id,
not by the layout; checked exactly), so any wiring error (a rank generating other tokens, a
mask off by one, an advantage on the wrong sample) shows at 1e-2 or more.

Finally an end-to-end torchrun run (2 processes, DP=2) with --on-policy-fraction 0.5
--rollouts-per-prompt 2 --rl-loss-weight 0.5 (default exact-match reward on numeric references)
writes the rollout metrics to the JSONL file.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from tests._dist_utils import run_distributed
from tests.distributed.test_launcher import _torchrun
from tests.unit.data_fixtures import WORDS, make_tiny_tokenizer, write_rows

DIGITS = [str(d) for d in range(10)]
SEQ = 32
RTOL = 1e-5
LAYOUT_ITERS = 2


def length_reward(prompt: str, response: str, reference: str) -> float:
    """A reward that differs between rollouts of one prompt: the response's word count."""
    return float(len(response.split()))


def _rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Chat rows 'what is two and three' -> '5' (reference '5'), some with a system turn."""
    rng = random.Random(seed)
    names = ["one", "two", "three", "four"]
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        filler = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(0, 4)))
        messages = [{"role": "user", "content": f"what is {names[a - 1]} and {names[b - 1]} {filler}".strip()},
                    {"role": "assistant", "content": f"the answer is {a + b}"}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "answer please"})
        rows.append({"messages": messages, "reference": str(a + b)})
    return rows


def _shapes(vocab: int):
    from megatron_distill.config import ModelShape

    student = ModelShape(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=vocab,
        max_position_embeddings=64, ffn_hidden_size=48, swiglu=True, normalization="RMSNorm",
        position_embedding_type="rope", init_method_std=0.05, hidden_dropout=0.0, attention_dropout=0.0,
    )
    teacher = ModelShape(
        num_layers=2, hidden_size=48, num_attention_heads=4, vocab_size=vocab, max_position_embeddings=64,
        normalization="LayerNorm", position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return student, teacher


def _config(setup: dict, tp: int = 1, pp: int = 1, *, loss=None, rollout=None, student=None, clip_grad=1.0):
    from megatron_distill.config import DistillConfig, LossConfig, ParallelConfig, RolloutConfig, TrainConfig

    s, t = _shapes(setup["vocab"])
    return DistillConfig(
        student=student or s, teacher=t, parallel=ParallelConfig(tp, pp),
        loss=LossConfig(**{"kind": "jsd", "beta": 0.4, "temperature": 1.5, "ce_weight": 0.1,
                           "impl": "reference", **(loss or {})}),
        train=TrainConfig(seq_length=SEQ, micro_batch_size=2, global_batch_size=8, train_iters=3, lr=1e-2,
                          lr_decay_style="constant", clip_grad=clip_grad, device="cpu"),
        rollout=RolloutConfig(**(rollout or {})),
    )


ON_POLICY = {"on_policy_fraction": 0.5, "rollouts_per_prompt": 2, "rl_loss_weight": 0.5, "temperature": 0.9,
             "top_k": 20, "max_new_tokens": 8, "seed": 5}


def _engine(cfg, setup: dict, weights: dict | None):
    """A fresh engine at cfg's layout (the parallel state must match), loaded with the full weights."""
    from megatron_distill.config import validate
    from megatron_distill.engine import build_model, init_model_parallel, wrap_stage
    from megatron_distill.models.sharding import load_full_state_dict
    from megatron_distill.pipeline.stage import DistillStage

    validate(replace(cfg, data=replace(cfg.data, train_data=[setup["rows"]], tokenizer_model=setup["tok"])),
             torch.distributed.get_world_size())
    pg = init_model_parallel(cfg, seed=1)
    student = build_model(cfg.student, cfg, pg, trainable=True)
    teacher = build_model(cfg.teacher, cfg, pg, trainable=False)
    if weights is not None:
        for model, shape, key in ((student, cfg.student, "student"), (teacher, cfg.teacher, "teacher")):
            load_full_state_dict(model, {k: v for k, v in weights[key].items() if not k.endswith("_extra_state")},
                                 num_layers=shape.num_layers, pp_rank=pg.pp.rank(), pp_size=pg.pp.size(),
                                 tp_rank=pg.tp.rank(), tp_size=pg.tp.size(), gated_mlp=shape.swiglu)
    output_mode = "hidden" if cfg.loss.impl == "fused" else "logits"
    return wrap_stage(DistillStage(student, teacher, output_mode=output_mode), cfg, pg)


def _data(cfg, setup: dict, engine, on_policy: bool, reward_fn=length_reward):
    from megatron_distill.data.chat import ChatBatches
    from megatron_distill.data.tokenizer import load_tokenizer
    from megatron_distill.onpolicy import OnPolicyData

    tokenizer = load_tokenizer("HuggingFaceTokenizer", setup["tok"])
    t = cfg.train
    data = ChatBatches(setup["rows"], tokenizer, t.seq_length, t.global_batch_size, t.micro_batch_size,
                       dp_rank=engine.pg.dp.rank(), dp_size=engine.pg.dp.size(), seed=3)
    if not on_policy:
        return data
    return OnPolicyData(data, engine, tokenizer, cfg.rollout, device=torch.device("cpu"), reward_fn=reward_fn)


def _train(cfg, setup: dict, weights, on_policy: bool, iters: int) -> dict:
    """``iters`` iterations through the runner's loop; what to compare between runs."""
    from megatron_distill.engine import set_seed
    from megatron_distill.metrics import MetricsLogger
    from megatron_distill.platform import DeviceContext
    from megatron_distill.runner import _loop

    engine = _engine(cfg, setup, weights)
    data = _data(cfg, setup, engine, on_policy)
    tokens = []
    get = data.get

    def recording_get(i):
        batches = get(i)
        tokens.append(torch.cat([b["tokens"] for b in batches]))
        return batches

    data.get = recording_get
    set_seed(11)
    ctx = DeviceContext(device=torch.device("cpu"), backend="gloo", rank=torch.distributed.get_rank(),
                        world_size=torch.distributed.get_world_size(), local_rank=0)
    logger = MetricsLogger(None, 1, iters)  # rank 1 never prints
    history = _loop(engine, data, iters, ctx, logger, log_interval=1)
    keys = ("kd_loss_on_policy", "kd_loss_off_policy", "pg_loss", "reward_mean", "on_policy_samples")
    return {
        "loss": [s.loss for s in history], "kd": [s.kd_loss for s in history], "ce": [s.ce_loss for s in history],
        "grad_norm": [s.grad_norm for s in history], "num_tokens": [s.num_tokens for s in history],
        "extra": [{k: s.extra[k] for k in keys if k in s.extra} for s in history],
        "all_extra": [dict(s.extra) for s in history], "tokens": tokens,
    }


def _check_masks(cfg, setup: dict, weights) -> dict:
    """Built micro-batches against generate()'s outputs, for student and teacher rollouts."""
    engine = _engine(cfg, setup, weights)
    data = _data(cfg, setup, engine, on_policy=True)
    plain = data.data.get(0)
    batches = data.get(0)
    tokens = torch.cat([b["tokens"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches])
    flags = torch.cat([b["on_policy"] for b in batches])
    meta = [m for b in batches for m in b["meta"]]
    plain_tokens = torch.cat([b["tokens"] for b in plain])
    plain_meta = [m for b in plain for m in b["meta"]]
    generated, who = set(), {}
    for ro in data.last_rollouts:
        out = ro.output
        assert out.response_mask.any(), "nothing was generated: the test would check nothing"
        for r, slot in enumerate(ro.slots):
            generated.add(slot)
            who[slot] = ro.who
            n = int(out.lengths[r])
            p = int(out.prompt_lengths[r])
            first = slot - slot % cfg.rollout.rollouts_per_prompt
            # The prompt is the group's first dataset row's prompt.
            assert torch.equal(out.tokens[r, :p], plain_tokens[first, : plain_meta[first]["prompt_length"]])
            assert torch.equal(tokens[slot, : n - 1], out.tokens[r, : n - 1])
            assert torch.equal(labels[slot, : n - 1], out.tokens[r, 1:n])
            assert torch.equal(mask[slot, : n - 1].bool(), out.response_mask[r, 1:n])
            assert int(mask[slot].sum()) == int(out.response_lengths[r])  # every generated token, once
            assert not mask[slot, n - 1:].any() and (tokens[slot, n - 1:] == data.data.pad_token_id).all()
            assert meta[slot]["rollout"] == ro.who
            assert flags[slot] == (1.0 if ro.who == "student" else 0.0)
    for slot in set(range(tokens.shape[0])) - generated:  # dataset samples pass unchanged
        assert torch.equal(tokens[slot], plain_tokens[slot]) and flags[slot] == 0
    return {"generated": len(generated), "who": sorted(set(who.values())), "samples": tokens.shape[0]}


def _check_rl_gradient(setup: dict, weights) -> dict:
    """kd weight 0, rl weight 1: the engine's loss and gradients vs a hand-computed REINFORCE loss."""
    from megatron_distill.engine import build_model
    from megatron_distill.models.sharding import layer_offset, load_full_state_dict, param_layouts
    from megatron_distill.training import run_iteration

    temperature = 0.8
    cfg = _config(setup, loss={"kd_weight": 0.0, "ce_weight": 0.0},
                  rollout={**ON_POLICY, "on_policy_fraction": 1.0, "rl_loss_weight": 1.0,
                           "temperature": temperature, "top_k": 0}, clip_grad=0.0)
    engine = _engine(cfg, setup, weights)
    data = _data(cfg, setup, engine, on_policy=True)
    batches = data.get(0)
    # Rewards and advantages by hand: decode each sample's response (its labels under the loss mask).
    tok = data.tokenizer
    rewards = []
    for b in batches:
        for j in range(b["tokens"].shape[0]):
            response = b["labels"][j][b["loss_mask"][j].bool()].tolist()
            rewards.append(length_reward("", tok.decode(response, skip_special_tokens=True), ""))
    group = cfg.rollout.rollouts_per_prompt
    advantages = [r - sum(rewards[i - i % group: i - i % group + group]) / group for i, r in enumerate(rewards)]
    got = torch.cat([b["advantages"] for b in batches]).tolist()
    assert got == pytest.approx(advantages, abs=1e-12)
    assert any(a != 0 for a in advantages), "all advantages are zero: the test would check nothing"
    # The direct computation on an unwrapped copy of the same student.
    pg = engine.pg
    plain = build_model(cfg.student, cfg, pg, trainable=True)
    load_full_state_dict(plain, {k: v for k, v in weights["student"].items() if not k.endswith("_extra_state")},
                         num_layers=cfg.student.num_layers, pp_rank=0, pp_size=1, tp_rank=0, tp_size=1,
                         gated_mlp=cfg.student.swiglu)
    plain.train()
    vocab = cfg.student.vocab_size
    total_tokens = sum(float(b["loss_mask"].sum()) for b in batches)
    loss, k = torch.zeros((), dtype=torch.float64), 0
    for b in batches:
        logits = plain(b["tokens"], b["position_ids"], None)[..., :vocab].double()
        logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1)
        for j in range(b["tokens"].shape[0]):
            loss = loss - advantages[k] * (logp[j] * b["loss_mask"][j].double()).sum()
            k += 1
    loss = loss / total_tokens
    loss.backward()
    stats = run_iteration(engine, batches, 1, torch.device("cpu"))
    layouts = param_layouts(engine.stage.student, layer_offset(cfg.student.num_layers, 0, 1), cfg.student.swiglu)
    grad_errors = {}
    plain_params = dict(plain.named_parameters())
    for name, param in engine.stage.student.named_parameters():
        ref = plain_params[name].grad.float()
        assert ref.norm() > 0, f"direct gradient of {name} is zero"
        grad_errors[layouts[name].global_name] = ((param.main_grad - ref).norm() / ref.norm()).item()
    return {"loss": stats.loss, "direct_loss": loss.item(), "pg_loss": stats.extra["pg_loss"],
            "kd": stats.kd_loss, "grad_errors": grad_errors, "num_tokens": stats.num_tokens,
            "direct_tokens": total_tokens}


def tp1_worker(setup: dict) -> dict:
    """Every TP1 case; saves the full weights the layout workers load."""
    from megatron_distill.engine import build_model, init_model_parallel
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    cfg = _config(setup)
    pg = init_model_parallel(cfg, seed=7)
    student = build_model(cfg.student, cfg, pg, trainable=True)
    teacher = build_model(cfg.teacher, cfg, pg, trainable=False)
    with torch.no_grad():
        teacher.output_layer.weight.mul_(8.0)  # a peaked teacher: divergences far from zero
    weights = {"student": student.state_dict(), "teacher": teacher.state_dict()}
    torch.save(weights, setup["weights"])
    out = {}
    # lambda = 0: the wrapper changes nothing, bitwise (dropout on: an RNG draw would show).
    s, _ = _shapes(setup["vocab"])
    dropout = replace(s, hidden_dropout=0.2, attention_dropout=0.2)
    lam0 = _config(setup, student=dropout, rollout={**ON_POLICY, "on_policy_fraction": 0.0, "rl_loss_weight": 0.0})
    out["offline"] = _train(lam0, setup, weights, on_policy=False, iters=2)
    out["lambda0"] = _train(lam0, setup, weights, on_policy=True, iters=2)
    out["masks"] = _check_masks(_config(setup, rollout=ON_POLICY), setup, weights)
    out["masks_seq_kd"] = _check_masks(_config(setup, rollout={**ON_POLICY, "seq_kd": True}), setup, weights)
    out["rl"] = _check_rl_gradient(setup, weights)
    out["on_policy"] = _train(_config(setup, rollout=ON_POLICY), setup, weights, on_policy=True, iters=LAYOUT_ITERS)
    # The fused loss path on on-policy batches: micro-batches of one part (groups of 2 = micro-batches
    # of 2) and micro-batches mixing both parts (groups of 1: samples 0, 2, 4, 6 are on-policy).
    no_rl = {**ON_POLICY, "rl_loss_weight": 0.0}
    for name, rollout in (("pure", no_rl), ("mixed", {**no_rl, "rollouts_per_prompt": 1})):
        for impl in ("reference", "fused"):
            cfg = _config(setup, loss={"impl": impl, "ce_weight": 0.0}, rollout=rollout)
            out[f"{name}_{impl}"] = _train(cfg, setup, weights, on_policy=True, iters=2)
    return out


def layouts_worker(setup: dict, layouts: list[tuple[int, int]]) -> dict:
    """The on-policy run at each (tp, pp) in turn, re-initialising Megatron's parallel state."""
    from megatron.core import parallel_state

    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    weights = torch.load(setup["weights"], weights_only=True)
    out = {}
    for tp, pp in layouts:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        out[(tp, pp)] = _train(_config(setup, tp, pp, rollout=ON_POLICY), setup, weights, on_policy=True,
                               iters=LAYOUT_ITERS)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("onpolicy")
    tok = make_tiny_tokenizer(root / "tok", extra_words=DIGITS)
    rows = write_rows(root / "rows.jsonl", _rows())
    vocab = len(AutoTokenizer.from_pretrained(str(tok)))
    return {"tok": str(tok), "rows": str(rows), "vocab": vocab, "weights": str(root / "full.pt"), "root": root}


@pytest.fixture(scope="module")
def tp1(setup):
    return run_distributed(tp1_worker, 1, setup, init_process_group=False, timeout=300)[0]


def test_lambda_zero_reproduces_offline_kd_bitwise(tp1):
    offline, lam0 = tp1["offline"], tp1["lambda0"]
    for key in ("loss", "kd", "ce", "grad_norm", "num_tokens"):
        assert offline[key] == lam0[key], key  # exact float equality
    assert all(torch.equal(a, b) for a, b in zip(offline["tokens"], lam0["tokens"], strict=True))
    for extra, kd in zip(lam0["extra"], lam0["kd"], strict=True):
        assert extra["on_policy_samples"] == 0 and "kd_loss_on_policy" not in extra
        assert extra["kd_loss_off_policy"] == pytest.approx(kd, rel=1e-6)


def test_loss_mask_covers_exactly_the_generated_tokens(tp1):
    assert tp1["masks"] == {"generated": 4, "who": ["student"], "samples": 8}  # lambda 0.5 of 4 groups of 2
    assert tp1["masks_seq_kd"] == {"generated": 8, "who": ["student", "teacher"], "samples": 8}


def test_rl_term_gradient_equals_hand_computed_reinforce(tp1):
    rl = tp1["rl"]
    assert rl["num_tokens"] == rl["direct_tokens"] > 0 and rl["kd"] == 0.0
    assert rl["loss"] == pytest.approx(rl["direct_loss"], rel=RTOL)
    assert rl["pg_loss"] == pytest.approx(rl["direct_loss"], rel=RTOL)
    worst = max(rl["grad_errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < RTOL, f"{worst[0]}: relative gradient error {worst[1]:.2e}"


@pytest.mark.parametrize("case", ["pure", "mixed"])
def test_fused_loss_path_on_on_policy_batches_matches_reference(tp1, case):
    _check_layout(tp1[f"{case}_fused"], tp1[f"{case}_reference"])
    assert all(e["on_policy_samples"] == 4 and "kd_loss_on_policy" in e and "kd_loss_off_policy" in e
               for e in tp1[f"{case}_fused"]["extra"])


def _check_layout(result: dict, reference: dict) -> None:
    assert all(torch.equal(a, b) for a, b in zip(result["tokens"], reference["tokens"], strict=True)), \
        "the layout generated other tokens"
    for key in ("loss", "kd", "ce", "grad_norm"):
        torch.testing.assert_close(result[key], reference[key], rtol=RTOL, atol=0)
    assert result["num_tokens"] == reference["num_tokens"]
    for got, want in zip(result["extra"], reference["extra"], strict=True):
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=1e-9), key


def test_reference_on_policy_run_is_nontrivial(tp1):
    ref = tp1["on_policy"]
    for extra in ref["all_extra"]:
        assert extra["on_policy_samples"] == 4 and extra["rollout_samples"] == 4
        assert extra["kd_loss_on_policy"] > 0 and extra["kd_loss_off_policy"] > 0
        assert extra["pg_loss"] != 0 and extra["reward_mean"] > 0
        assert extra["rollout_mean_response_length"] > 0 and 0 <= extra["rollout_truncated_fraction"] <= 1
        assert extra["rollout_tokens_per_sec"] > 0 and extra["train_seconds"] > 0
    assert not torch.equal(ref["tokens"][0], ref["tokens"][1])


def test_tp2_and_pp2_match_tp1(setup, tp1):
    results = run_distributed(layouts_worker, 2, setup, [(2, 1), (1, 2)], init_process_group=False, timeout=300)
    for rank_result in results:
        for layout in ((2, 1), (1, 2)):
            _check_layout(rank_result[layout], tp1["on_policy"])


def test_tp2_pp2_matches_tp1(setup, tp1):
    results = run_distributed(layouts_worker, 4, setup, [(2, 2)], init_process_group=False, timeout=300)
    for rank_result in results:
        _check_layout(rank_result[(2, 2)], tp1["on_policy"])


def test_launcher_on_policy_rl_run_writes_rollout_metrics(setup):
    metrics = setup["root"] / "metrics.jsonl"
    proc = _torchrun(
        2, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size",
        str(setup["vocab"]), "--seq-length", str(SEQ), "--position-embedding-type", "rope", "--swiglu",
        "--normalization", "RMSNorm", "--teacher-hidden-size", "48", "--train-data", setup["rows"],
        "--tokenizer-model", setup["tok"], "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "2", "--lr", "1e-3", "--device", "cpu", "--kd-loss", "reverse_kl",
        "--on-policy-fraction", "0.5", "--rollouts-per-prompt", "2", "--rl-loss-weight", "0.5",
        "--rollout-max-new-tokens", "6", "--metrics-file", str(metrics), timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on-policy: fraction 0.5" in proc.stdout and "distillation loss: reference" in proc.stdout
    assert "rollout backend: megatron (in place" in proc.stdout
    assert "rollout " in proc.stdout and "reward " in proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for r in records:
        for key in ("rollout_seconds", "train_seconds", "rollout_tokens_per_sec", "rollout_mean_response_length",
                    "rollout_truncated_fraction", "reward_mean", "kd_loss_on_policy", "kd_loss_off_policy",
                    "pg_loss", "on_policy_samples"):
            assert key in r, key
        assert r["on_policy_samples"] == 4 and 0.0 <= r["reward_mean"] <= 1.0
        assert r["rollout_seconds"] > 0 and r["seconds"] >= r["train_seconds"]
