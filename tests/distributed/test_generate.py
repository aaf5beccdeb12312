"""KV-cache generation in place: equal to uncached argmax decoding, and the same under TP / PP.

Real Megatron-Core on gloo, two tiny models (RoPE + GQA + SwiGLU + RMSNorm with tied embeddings;
learned absolute positions + LayerNorm, untied), vocabulary 97 (padded under TP2). One spawn per
layout runs every case; all layouts load the same full weights.

* TP1: greedy generation with the KV cache on a batch of prompts of different lengths equals
  argmax decoding of each prompt alone by repeated full forward passes without a cache, and
  equals cached generation of each prompt alone.
* TP2, PP2, TP2 x PP2 (and TP2 with sequence parallelism): the same tokens as TP1 for greedy,
  temperature-only, top-k + top-p and top-p-only sampling with fixed seeds, on every rank.
* A stop token ends each sequence at its first occurrence; the response mask covers exactly
  the generated tokens, padding follows.
* The model's training mode and sequence-parallel setting are restored.
* With the fused RoPE kernel (``--rope-fusion``, CUDA in the engine; the Triton interpreter here)
  in Megatron's ``apply_rope_fusion`` slot: the same logits and tokens as Megatron's own RoPE.
"""

from __future__ import annotations

import pytest
import torch

from tests._dist_utils import run_distributed

VOCAB = 97
PAD = 0
PROMPT_LENGTHS = [6, 3, 5, 1]
MAX_NEW = 7


def _shapes():
    from megatron_distill.config import ModelShape

    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=32, init_method_std=0.1, hidden_dropout=0.1, attention_dropout=0.1)
    return {
        "rope": ModelShape(num_query_groups=2, ffn_hidden_size=48, swiglu=True, normalization="RMSNorm",
                           position_embedding_type="rope", **common),
        "learned": ModelShape(normalization="LayerNorm", position_embedding_type="learned_absolute",
                              untie_embeddings_and_output_weights=True, **common),
    }


def _cases():
    from megatron_distill.rollout.sampling import SamplingParams

    return {
        "greedy": SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0),
        "temperature": SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=11),
        "top_k_top_p": SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_k=12, top_p=0.9, seed=5),
        "top_p": SamplingParams(max_new_tokens=MAX_NEW, temperature=1.2, top_p=0.7, seed=3, max_candidates=16),
    }


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, VOCAB, (len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), generator=gen)
    lengths = torch.tensor(PROMPT_LENGTHS)
    prompts[torch.arange(prompts.shape[1]) >= lengths.unsqueeze(1)] = PAD
    return prompts, lengths


def _build(shape, tp: int, pp: int, sequence_parallel: bool, full: dict | None):
    from megatron_distill.config import DistillConfig, ParallelConfig, TrainConfig
    from megatron_distill.engine import build_model, init_model_parallel
    from megatron_distill.models.sharding import load_full_state_dict

    cfg = DistillConfig(shape, shape, parallel=ParallelConfig(tp, pp, sequence_parallel),
                        train=TrainConfig(device="cpu"))
    pg = init_model_parallel(cfg, seed=1)
    model = build_model(shape, cfg, pg, trainable=True)
    if full is not None:
        load_full_state_dict(model, {k: v for k, v in full.items() if not k.endswith("_extra_state")},
                             num_layers=shape.num_layers, pp_rank=pg.pp.rank(), pp_size=pp,
                             tp_rank=pg.tp.rank(), tp_size=tp, gated_mlp=shape.swiglu)
    return model, pg


def _run_cases(model, pg) -> dict:
    from megatron_distill.rollout.generate import generate
    from megatron_distill.rollout.sampling import SamplingParams

    prompts, lengths = _prompts()
    out = {}
    for case, params in _cases().items():
        res = generate(model, prompts, params, vocab_size=VOCAB, pg=pg, prompt_lengths=lengths, pad_token_id=PAD)
        out[case] = res
    # Stop token: the greedy token of row 0 at step 2 (it may occur earlier in other rows).
    greedy = out["greedy"]
    stop = int(greedy.tokens[0, PROMPT_LENGTHS[0] + 2])
    eos = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(stop,))
    out["eos"] = generate(model, prompts, eos, vocab_size=VOCAB, pg=pg, prompt_lengths=lengths, pad_token_id=PAD)
    out["eos_stop_id"] = stop
    # Every row stops by its second token, long before MAX_NEW: the same output whichever number of
    # steps passes between the checks that all rows have stopped (the extra steps are trimmed).
    import megatron_distill.rollout.generate as generate_module

    stops = tuple(sorted({int(greedy.tokens[i, n + 1]) for i, n in enumerate(PROMPT_LENGTHS)}))
    all_stop = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=stops)
    default = generate_module.STOP_CHECK_INTERVAL
    for interval in sorted({1, 3, default}):
        generate_module.STOP_CHECK_INTERVAL = interval
        try:
            out[f"all_stop_every_{interval}"] = generate(model, prompts, all_stop, vocab_size=VOCAB, pg=pg,
                                                         prompt_lengths=lengths, pad_token_id=PAD)
        finally:
            generate_module.STOP_CHECK_INTERVAL = default
    return out


def _uncached_greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """Argmax decoding by a full forward pass per new token (TP1 x PP1, eval, no cache)."""
    tokens = prompt.clone().unsqueeze(0)
    with torch.no_grad():
        for _ in range(steps):
            pos = torch.arange(tokens.shape[1]).unsqueeze(0)
            logits = model(tokens, pos, None)  # [1, s, V]
            nxt = logits[0, -1, :VOCAB].argmax()
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0, prompt.numel():].tolist()


def _summary(res) -> dict:
    return {k: getattr(res, k) for k in ("tokens", "response_mask", "prompt_lengths", "response_lengths",
                                         "truncated")}


def tp1_worker(weights_path: str) -> dict:
    """Build the full models (saved for the other layouts) and run every TP1 case and reference."""
    from megatron_distill.platform import init_distributed
    from megatron_distill.rollout.generate import generate
    from megatron_distill.rollout.sampling import SamplingParams

    init_distributed("cpu")
    prompts, lengths = _prompts()
    results, weights = {}, {}
    for name, shape in _shapes().items():
        model, pg = _build(shape, 1, 1, False, None)
        weights[name] = model.state_dict()
        cases = _run_cases(model, pg)
        assert model.training, "generate must restore training mode"
        res = {case: (_summary(r) if not isinstance(r, int) else r) for case, r in cases.items()}
        greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
        res["alone"] = [
            generate(model, prompts[i : i + 1, :n], greedy, vocab_size=VOCAB, pg=pg).tokens[0, n:].tolist()
            for i, n in enumerate(PROMPT_LENGTHS)
        ]
        model.eval()
        res["uncached"] = [_uncached_greedy(model, prompts[i, :n], MAX_NEW) for i, n in enumerate(PROMPT_LENGTHS)]
        res["tokens_per_sec"] = cases["greedy"].tokens_per_sec
        results[name] = res
    torch.save(weights, weights_path)
    return results


def layout_worker(weights_path: str, tp: int, pp: int, sequence_parallel: bool) -> dict:
    """Every case at TP=tp x PP=pp on this rank; returns what to compare with TP1."""
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    full = torch.load(weights_path, weights_only=True)
    results = {}
    for name, shape in _shapes().items():
        model, pg = _build(shape, tp, pp, sequence_parallel, full[name])
        cases = _run_cases(model, pg)
        res = {case: (_summary(r) if not isinstance(r, int) else r) for case, r in cases.items()}
        res["restored"] = model.training and model.config.sequence_parallel == sequence_parallel
        results[name] = res
    return results


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("generate") / "full.pt")
    results = run_distributed(tp1_worker, 1, path, init_process_group=False, timeout=300)[0]
    return path, results


def _response(summary: dict, row: int) -> list[int]:
    start = int(summary["prompt_lengths"][row])
    return summary["tokens"][row, start : start + int(summary["response_lengths"][row])].tolist()


@pytest.mark.parametrize("model_name", ["rope", "learned"])
def test_kv_cache_greedy_equals_uncached_argmax(tp1, model_name):
    res = tp1[1][model_name]
    greedy = res["greedy"]
    prompts, lengths = _prompts()
    for i, n in enumerate(PROMPT_LENGTHS):
        assert greedy["tokens"][i, :n].tolist() == prompts[i, :n].tolist()
        assert _response(greedy, i) == res["uncached"][i], f"row {i}"
        assert _response(greedy, i) == res["alone"][i], f"row {i}: batched != alone"
    assert bool(greedy["truncated"].all())
    assert greedy["response_lengths"].tolist() == [MAX_NEW] * len(PROMPT_LENGTHS)
    assert res["tokens_per_sec"] > 0


@pytest.mark.parametrize("model_name", ["rope", "learned"])
def test_stop_token_and_response_mask(tp1, model_name):
    res = tp1[1][model_name]
    greedy, eos, stop = res["greedy"], res["eos"], res["eos_stop_id"]
    width = eos["tokens"].shape[1]
    for i, n in enumerate(PROMPT_LENGTHS):
        full = _response(greedy, i)
        expected = full[: full.index(stop) + 1] if stop in full else full
        got = _response(eos, i)
        assert got == expected, f"row {i}"
        assert bool(eos["truncated"][i]) == (stop not in full)
        mask = eos["response_mask"][i]
        assert mask.tolist() == [n <= c < n + len(expected) for c in range(width)]
        assert (eos["tokens"][i, n + len(expected) :] == PAD).all()
    # Row 0 stops at step 2: the batch still runs until every row stops or MAX_NEW.
    assert int(eos["response_lengths"][0]) <= 3


@pytest.mark.parametrize("model_name", ["rope", "learned"])
def test_stop_check_interval_does_not_change_the_output(tp1, model_name):
    from megatron_distill.rollout.generate import STOP_CHECK_INTERVAL

    res = tp1[1][model_name]
    every_step = res["all_stop_every_1"]
    assert not every_step["truncated"].any() and int(every_step["response_lengths"].max()) <= 2
    assert every_step["tokens"].shape[1] < max(PROMPT_LENGTHS) + MAX_NEW  # it did stop early
    for interval in sorted({3, STOP_CHECK_INTERVAL}):
        for key, value in every_step.items():
            assert torch.equal(res[f"all_stop_every_{interval}"][key], value), f"every {interval} steps: {key}"


def _assert_same(got: dict, ref: dict, where: str) -> None:
    for case in ("greedy", "temperature", "top_k_top_p", "top_p", "eos", "all_stop_every_1"):
        for key, value in ref[case].items():
            assert torch.equal(got[case][key], value), f"{where}: case {case}, {key} differs from TP1"
    assert got["eos_stop_id"] == ref["eos_stop_id"]


@pytest.mark.parametrize(
    "tp,pp,sp", [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)],
    ids=["tp2", "tp2-sp", "pp2", "tp2xpp2"],
)
def test_layouts_generate_same_tokens_as_tp1(tp1, tp, pp, sp):
    path, reference = tp1
    per_rank = run_distributed(layout_worker, tp * pp, path, tp, pp, sp, init_process_group=False,
                               timeout=400)
    for rank, results in enumerate(per_rank):
        for name, ref in reference.items():
            assert results[name]["restored"], f"rank {rank}: mode / sequence parallel not restored"
            _assert_same(results[name], ref, f"rank {rank}, model {name}, TP{tp} PP{pp} SP={sp}")


def test_sdpa_causal_queries_align_with_the_last_cached_keys():
    """A chunk of ``sq`` queries against ``sk > sq`` cached keys (no explicit mask): bottom-right
    causal, i.e. the last ``sq`` rows of full causal attention; ``sq == 1`` sees every key."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_distill.config import ModelShape, ParallelConfig
    from megatron_distill.models.builder import transformer_config
    from megatron_distill.models.sdpa_attention import SDPACoreAttention

    shape = ModelShape(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2, vocab_size=8,
                       max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
    attn = SDPACoreAttention(transformer_config(shape, ParallelConfig(), bf16=False, for_training=False), 1,
                             AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    s, b = 7, 2
    q, k, v = (torch.randn(s, b, n, 4, generator=gen) for n in (4, 2, 2))
    full = attn(q, k, v, None)
    for sq in (3, 1):
        torch.testing.assert_close(attn(q[-sq:], k, v, None), full[-sq:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attn(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask), full[-1:],
                               rtol=1e-6, atol=1e-6)


def rope_fusion_worker(weights_path: str) -> dict:
    """The rope model (TP1) with --rope-fusion's kernel (Triton interpreter here; the engine turns it
    on only on CUDA): a full forward, and the greedy / sampled cases with the KV cache."""
    import megatron_distill.engine as engine
    from megatron_distill.models import rope_fusion
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    real_config = engine.transformer_config
    engine.transformer_config = lambda *a, **k: real_config(*a, **{**k, "rope_fusion": True})
    calls = []
    real_launch = rope_fusion._launch
    rope_fusion._launch = lambda x, freqs, backward: calls.append(x.shape[0]) or real_launch(x, freqs, backward)
    try:
        full = torch.load(weights_path, weights_only=True)
        model, pg = _build(_shapes()["rope"], 1, 1, False, full["rope"])
        assert model.config.apply_rope_fusion
        prompts, _ = _prompts()
        model.eval()
        with torch.no_grad():
            logits = model(prompts, torch.arange(prompts.shape[1]).expand_as(prompts), None)
        model.train()
        cases = _run_cases(model, pg)
    finally:
        engine.transformer_config = real_config
        rope_fusion._launch = real_launch
    res = {case: (_summary(r) if not isinstance(r, int) else r) for case, r in cases.items()}
    return {"cases": res, "logits": logits, "decode_calls": calls.count(1), "calls": len(calls)}


def test_rope_fusion_kernel_generates_like_megatron_rope(tp1):
    """The fused RoPE in Megatron's apply_rope_fusion slot: the same forward logits (fp32 rounding)
    and the same tokens in every generation case as Megatron's unfused RoPE, decode steps included
    (one-token queries at growing offsets, which go through the kernel too)."""
    path, reference = tp1
    got = run_distributed(rope_fusion_worker, 1, path, init_process_group=False, timeout=300)[0]
    assert got["decode_calls"] > 0 and got["calls"] > got["decode_calls"]
    _assert_same(got["cases"], reference["rope"], "fused RoPE")
    full = torch.load(path, weights_only=True)["rope"]
    ref_logits = run_distributed(_unfused_logits_worker, 1, full, init_process_group=False, timeout=120)[0]
    torch.testing.assert_close(got["logits"], ref_logits, rtol=1e-5, atol=1e-5)


def _unfused_logits_worker(full: dict) -> torch.Tensor:
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    model, _ = _build(_shapes()["rope"], 1, 1, False, full)
    prompts, _ = _prompts()
    model.eval()
    with torch.no_grad():
        return model(prompts, torch.arange(prompts.shape[1]).expand_as(prompts), None)
