"""The sglang rollout backend (``--rollout-backend sglang``) against a stand-in sglang server.

sglang needs a GPU and is not installed here: every test talks to ``tests/_sglang_standin.py``, an
``http.server`` that follows sglang's documented request / answer format (``/generate`` with
``input_ids`` + ``sampling_params``, answers with ``output_ids`` + ``meta_info.finish_reason``;
``/update_weights_from_disk`` with ``model_path``), refuses what sglang refuses (unknown sampling
keys, ``top_k`` 0, a missing API key) and generates with ``transformers`` from the directory it
was told to load. Nothing here has run against a real sglang server.

Client (in process, a scripted next-token function instead of a model):

* sampling params are translated (top-k 0 -> -1, temperature, top-p, stop ids, max tokens), and
  the stand-in, which refuses top-k 0, accepts them; the API key from the environment is sent;
* a server that is down, or answers 500, raises after the retries an error naming the URL;
  a 4xx is not retried; a failed weight update names the server's message;
* an answer longer than the room is cut to it (truncated), tokens after a stop token are dropped,
  a stop token the server left out is put back, ids outside the vocabulary are refused.

Engine (one 2-process gloo spawn, a tiny Llama student loaded from an HF dir, greedy rollouts):

* TP2 x DP1: one /generate request for the DP group (4 prompts), both TP ranks get the same
  tokens, equal to the in-place Megatron ``generate`` on the same weights; the built micro-batches
  equal the in-place backend's, and the loss mask is 1 on exactly the generated tokens; the
  export of a student without an HF config of its own names the stop ids as ``eos_token_id``;
* DP2 x TP1, sync every 2 iterations: one request per DP rank with its own prompts; the weights
  the stand-in loaded equal the HF checkpoint the engine started from (bitwise), after an optimizer
  step no new export at the next iteration (``weight_sync_seconds`` 0), then at the one after the
  stand-in loads exactly the trained student's weights and the rollouts equal the in-place ones
  again; only the two newest exports are kept.

A 1-process launcher run (flags -> runner) logs the backend, syncs and generates through the
stand-in each iteration and writes ``weight_sync_seconds`` to the metrics file.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

import pytest
import torch

from megatron_distill.rollout.sampling import SamplingParams
from megatron_distill.rollout.sglang_backend import (
    API_KEY_ENV,
    Completion,
    SglangClient,
    SglangError,
    SglangUnavailableError,
    completions_to_output,
    sampling_payload,
)
from tests._dist_utils import free_port, run_distributed
from tests._sglang_standin import SglangStandIn
from tests.unit.data_fixtures import WORDS, make_tiny_tokenizer, write_rows

V = 50


@pytest.fixture
def standin():
    servers = []

    def make(**kwargs) -> tuple[SglangStandIn, str]:
        server = SglangStandIn(**kwargs)
        servers.append(server)
        return server, server.start()

    yield make
    for server in servers:
        server.stop()


def counting(ids: list[int]) -> int:
    """A scripted model: the next token is the last one + 1 (mod V)."""
    return (ids[-1] + 1) % V


# --------------------------------------------------------------------------- client


def test_sampling_params_are_translated_to_sglangs(standin):
    params = SamplingParams(max_new_tokens=9, temperature=0.7, top_k=0, top_p=0.9, stop_token_ids=(13, 40))
    payload = sampling_payload(params)
    assert payload == {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": -1,
                       "stop_token_ids": [13, 40], "no_stop_trim": True}
    assert sampling_payload(replace(params, top_k=20))["top_k"] == 20
    assert sampling_payload(replace(params, temperature=0.0))["temperature"] == 0.0  # greedy in both
    server, url = standin(next_token=counting)
    out = SglangClient(url, retries=0).generate([[10, 11], [30]], params)
    sent = server.generate_requests[-1]
    assert sent["input_ids"] == [[10, 11], [30]] and sent["sampling_params"] == payload
    # Counting up from 11 reaches stop id 13 after 2 tokens; from 30 no stop within 9 tokens.
    assert out == [Completion([12, 13], "stop", 13), Completion(list(range(31, 40)), "length", None)]
    # What the translation avoids: sglang (and the stand-in) refuse top_k 0.
    status, answer = server.handle("/generate", {}, b'{"input_ids": [[1]], "sampling_params": {"top_k": 0}}')
    assert status == 400 and "top_k must be -1" in answer["error"]["message"]
    status, answer = server.handle("/generate", {}, b'{"input_ids": [[1]], "sampling_params": {"seed": 1}}')
    assert status == 400 and "unexpected keyword argument 'seed'" in answer["error"]["message"]


def test_api_key_from_the_environment_is_sent(standin, monkeypatch):
    server, url = standin(api_key="s3cret", next_token=counting)
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    assert SglangClient(url, retries=0).generate([[1]], params)[0].output_ids == [2, 3]
    assert server.headers[-1]["Authorization"] == "Bearer s3cret"
    monkeypatch.delenv(API_KEY_ENV)
    attempts = server.attempts
    with pytest.raises(SglangError, match=rf"{url}/generate refused .*HTTP 401") as info:
        SglangClient(url, retries=3, backoff_s=0.0).generate([[1]], params)
    assert not isinstance(info.value, SglangUnavailableError)
    assert server.attempts == attempts + 1  # a 4xx is not retried


def test_server_down_names_the_url_after_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = SglangClient(url, retries=2, backoff_s=0.01, timeout_s=5)
    with pytest.raises(SglangUnavailableError, match=rf"{url}/generate did not answer .* after 3 attempt\(s\)"):
        client.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    with pytest.raises(SglangUnavailableError, match=rf"{url}/update_weights_from_disk"):
        client.update_weights_from_disk("/some/dir")


def test_http_500_is_retried_then_names_url_status_and_body(standin):
    server, url = standin(fail_status=500)
    with pytest.raises(SglangUnavailableError, match=rf"{url}/generate .*3 attempt.*HTTP 500.*stand-in failure 500"):
        SglangClient(url, retries=2, backoff_s=0.01).generate([[1]], SamplingParams(max_new_tokens=2))
    assert server.attempts == 3


def test_failed_weight_update_names_the_servers_message(standin, tmp_path):
    server, url = standin()
    with pytest.raises(SglangError, match=rf"{url}/update_weights_from_disk refused .*HTTP 400.*Failed to update"):
        SglangClient(url, retries=0).update_weights_from_disk(str(tmp_path / "missing"))
    assert server.update_paths == [str(tmp_path / "missing")]


def test_answer_longer_than_the_room_is_truncated(standin):
    server, url = standin(next_token=counting, overshoot=5)  # ignores max_new_tokens, 5 tokens more
    params = SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=(45,))
    prompts = torch.tensor([[1, 2, 3], [40, 0, 0]])
    lengths = torch.tensor([3, 1])
    answers = SglangClient(url, retries=0).generate([[1, 2, 3], [40]], params)
    assert [len(a.output_ids) for a in answers] == [9, 5]  # 40 -> 41..45, stop at 45 (the 5th token)
    out = completions_to_output(prompts, lengths, answers, params, vocab_size=V, pad_token_id=0, seconds=0.1)
    assert out.response_lengths.tolist() == [4, 4] and out.truncated.tolist() == [True, True]
    assert out.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7], [40, 41, 42, 43, 44, 0, 0]]
    assert out.response_mask.sum(1).tolist() == [4, 4] and out.response_mask[1, 1:5].all()


def test_stop_tokens_end_the_response_as_in_place():
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(9, 8))
    prompts, lengths = torch.tensor([[5, 6]]), torch.tensor([2])

    def run(c: Completion):
        out = completions_to_output(prompts, lengths, [c], params, vocab_size=V, pad_token_id=0, seconds=0.0)
        return out.tokens[0, 2:].tolist(), int(out.response_lengths[0]), bool(out.truncated[0])

    assert run(Completion([1, 9, 4, 4], "length")) == ([1, 9], 2, False)  # cut after the first stop id
    assert run(Completion([1, 2], "stop", 8)) == ([1, 2, 8], 3, False)  # stop token left out: put back
    assert run(Completion([1, 2, 8], "stop", 8)) == ([1, 2, 8], 3, False)
    assert run(Completion([1, 2, 3, 4, 5], "stop", 9)) == ([1, 2, 3, 4, 5, 9], 6, False)  # stop is the 6th
    assert run(Completion([1, 2, 3, 4, 5, 6], "stop", 9)) == ([1, 2, 3, 4, 5, 6], 6, True)  # 7th: cut
    assert run(Completion([1, 2, 7], "stop", 7)) == ([1, 2, 7], 3, False)  # the server's own EOS
    assert run(Completion([], "length")) == ([], 0, True)
    with pytest.raises(SglangError, match=r"outside \[0, 50\)"):
        run(Completion([1, 50], "length"))


def test_malformed_answers_name_the_url(standin):
    server, url = standin(next_token=counting, strip_stop=True)
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(3,))
    assert SglangClient(url, retries=0).generate([[1]], params) == [Completion([2], "stop", 3)]
    client = SglangClient(url, retries=0)
    with pytest.raises(SglangError, match=rf"{url}/generate, answer 0: no 'output_ids'"):
        client._completion({"text": "hi", "meta_info": {"finish_reason": {"type": "stop"}}}, 0)
    with pytest.raises(SglangError, match="did not finish"):
        client._completion({"output_ids": [1], "meta_info": {"finish_reason": {"type": "abort"}}}, 0)


# --------------------------------------------------------------------------- engine

SEQ = 32
MAX_NEW = 8


def _rows(n: int = 16) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS[:30]) for _ in range(rng.randint(2, 6)))
        rows.append({"messages": [{"role": "user", "content": words},
                                  {"role": "assistant", "content": "the cat sat on the mat"}]})
    return rows


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory):
    """Tokenizer, chat rows and a tiny random Llama student saved as an HF dir (eos = the tokenizer's)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from megatron_distill.config import ModelShape
    from megatron_distill.models.hf_config import hf_config_from_shape

    root = tmp_path_factory.mktemp("sglang")
    tok_dir = make_tiny_tokenizer(root / "tok")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    shape = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=len(tok),
                       max_position_embeddings=64, ffn_hidden_size=48, swiglu=True, normalization="RMSNorm",
                       position_embedding_type="rope", add_bias_linear=False,
                       untie_embeddings_and_output_weights=True)
    config = AutoConfig.for_model("llama", **{k: v for k, v in hf_config_from_shape(shape).items()
                                              if k not in ("architectures", "model_type")},
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread-out logits: greedy decoding far from ties
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    hf_dir = root / "student"
    model.save_pretrained(str(hf_dir))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return {"tok": str(tok_dir), "rows": str(write_rows(root / "rows.jsonl", _rows())), "hf": str(hf_dir),
            "root": str(root), "weights": weights}


def _config(setup: dict, tp: int, url: str, weights_dir: str, interval: int, student_hf: str | None):
    from megatron_distill.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        LossConfig,
        ParallelConfig,
        RolloutConfig,
        TrainConfig,
    )
    from megatron_distill.models.hf_config import shape_from_hf_config

    shape = replace(shape_from_hf_config(setup["hf"]), hidden_dropout=0.0, attention_dropout=0.0)
    return DistillConfig(
        student=shape, teacher=shape, parallel=ParallelConfig(tp, 1),
        loss=LossConfig(kind="reverse_kl", impl="reference"),
        train=TrainConfig(seq_length=SEQ, micro_batch_size=2, global_batch_size=8, lr=0.05,
                          lr_decay_style="constant", device="cpu"),
        data=DataConfig(train_data=[setup["rows"]], tokenizer_model=setup["tok"]),
        checkpoint=CheckpointConfig(student_hf=student_hf),
        rollout=RolloutConfig(on_policy_fraction=0.5, rollouts_per_prompt=2, temperature=0.0,
                              max_new_tokens=MAX_NEW, backend="sglang", sglang_url=url,
                              sglang_weights_dir=weights_dir, sglang_sync_interval=interval),
    )


def _engine(cfg, setup: dict):
    from megatron_distill.config import validate
    from megatron_distill.engine import build_model, init_model_parallel, wrap_stage
    from megatron_distill.models.hf_convert import load_hf_into_stage
    from megatron_distill.pipeline.stage import DistillStage

    validate(cfg, torch.distributed.get_world_size())
    pg = init_model_parallel(cfg, seed=1)
    student = build_model(cfg.student, cfg, pg, trainable=True)
    teacher = build_model(cfg.teacher, cfg, pg, trainable=False)  # random: only scores
    load_hf_into_stage(student, setup["hf"], cfg.student, tp_rank=pg.tp.rank(), tp_size=pg.tp.size(),
                       pp_rank=0, pp_size=1)
    return wrap_stage(DistillStage(student, teacher, output_mode="logits"), cfg, pg)


def _sources(cfg, setup: dict, engine):
    """(sglang-backed, in-place) OnPolicyData over one chat source."""
    from megatron_distill.data.chat import ChatBatches
    from megatron_distill.data.tokenizer import load_tokenizer
    from megatron_distill.onpolicy import OnPolicyData

    tok = load_tokenizer("HuggingFaceTokenizer", setup["tok"])
    t = cfg.train
    data = ChatBatches(setup["rows"], tok, t.seq_length, t.global_batch_size, t.micro_batch_size,
                       dp_rank=engine.pg.dp.rank(), dp_size=engine.pg.dp.size(), seed=3)
    cpu = torch.device("cpu")
    in_place = replace(cfg.rollout, backend="megatron", sglang_url=None, sglang_weights_dir=None)
    return OnPolicyData(data, engine, tok, cfg.rollout, device=cpu), OnPolicyData(data, engine, tok, in_place,
                                                                                 device=cpu)


def _compare(sg_batches: list[dict], mg_batches: list[dict], sg) -> dict:
    """The sglang backend's micro-batches equal the in-place ones; the loss mask covers the generated tokens."""
    for a, b in zip(sg_batches, mg_batches, strict=True):
        for key in ("tokens", "labels", "loss_mask", "on_policy"):
            assert torch.equal(a[key], b[key]), f"{key} differs from the in-place backend's"
    tokens = torch.cat([b["tokens"] for b in sg_batches])
    mask = torch.cat([b["loss_mask"] for b in sg_batches])
    (ro,) = sg.last_rollouts
    out = ro.output
    assert ro.who == "student" and out.num_generated_tokens > 0
    for r, slot in enumerate(ro.slots):
        n = int(out.lengths[r])
        assert torch.equal(tokens[slot, : n - 1], out.tokens[r, : n - 1])
        assert torch.equal(mask[slot, : n - 1].bool(), out.response_mask[r, 1:n])
        assert int(mask[slot].sum()) == int(out.response_lengths[r]) and not mask[slot, n - 1:].any()
    prompts = [out.tokens[r, : int(out.prompt_lengths[r])].tolist() for r in range(len(ro.slots))]
    return {"tokens": tokens, "prompts": prompts, "generated": out.num_generated_tokens,
            "slots": list(ro.slots), "metrics": dict(sg._metrics)}


def _hf_state(engine) -> dict[str, torch.Tensor]:
    """The (TP1) student's weights under HF names."""
    from megatron_distill.models.hf_convert import megatron_to_hf_state_dict

    full = {k: v.detach().clone() for k, v in engine.stage.student.state_dict().items() if "_extra_state" not in k}
    return megatron_to_hf_state_dict(full, engine.cfg.student)


def engine_worker(setup: dict, url: str) -> dict:
    from megatron.core import parallel_state

    from megatron_distill.platform import init_distributed
    from megatron_distill.training import run_iteration

    init_distributed("cpu")
    cpu = torch.device("cpu")
    out: dict = {}
    # TP2 x DP1: one request for the DP group, the same tokens on both TP ranks.
    # No student_hf: the export's config is built from the shape, with the stop ids as eos_token_id.
    cfg = _config(setup, 2, url, os.path.join(setup["root"], "w_tp2"), interval=1, student_hf=None)
    engine = _engine(cfg, setup)
    sg, mg = _sources(cfg, setup, engine)
    out["tp2"] = _compare(sg.get(0), mg.get(0), sg)
    parallel_state.destroy_model_parallel()
    # DP2 x TP1, sync every 2 iterations.
    weights_dir = os.path.join(setup["root"], "w_dp2")
    cfg = _config(setup, 1, url, weights_dir, interval=2, student_hf=setup["hf"])
    engine = _engine(cfg, setup)
    sg, mg = _sources(cfg, setup, engine)
    batches = sg.get(0)
    out["dp2_it0"] = _compare(batches, mg.get(0), sg)
    run_iteration(engine, batches, 1, cpu)  # the student changes
    out["dp2_it1_sync"] = sg.get(1) and sg._metrics["weight_sync_seconds"]  # not due: the server keeps old weights
    batches2 = sg.get(2)
    out["dp2_it2"] = _compare(batches2, mg.get(2), sg)
    out["trained"] = _hf_state(engine)
    out["exports"] = sorted(os.listdir(weights_dir))
    out["tp_rank"], out["dp_rank"] = engine.pg.tp.rank(), engine.pg.dp.rank()
    return out


def test_engine_rollouts_from_the_standin_equal_in_place_ones(engine_setup, standin):
    server, url = standin()
    results = run_distributed(engine_worker, 2, engine_setup, url, init_process_group=False, timeout=240)
    root = engine_setup["root"]
    assert server.update_paths == [os.path.join(root, "w_tp2", "step_0000000"),
                                   os.path.join(root, "w_dp2", "step_0000000"),
                                   os.path.join(root, "w_dp2", "step_0000002")]
    # (a) The stand-in ran the student's weights: the HF start point, then the trained student.
    for loaded in server.loaded[:2]:
        assert loaded.keys() == engine_setup["weights"].keys()
        assert all(torch.equal(loaded[k], v) for k, v in engine_setup["weights"].items())
    trained = results[0]["trained"]
    assert all(torch.equal(server.loaded[2][k], trained[k]) for k in trained)
    assert all(torch.equal(results[1]["trained"][k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], engine_setup["weights"][k]) for k in trained)
    with open(os.path.join(root, "w_tp2", "step_0000000", "config.json")) as f:
        assert json.load(f)["eos_token_id"] == [3]  # the tiny tokenizer's </s>, also its end-of-turn
    # (b, c) are asserted in the workers (_compare); TP2: one request for the DP group, 4 prompts.
    tp2, dp2 = server.generate_requests[:1], server.generate_requests[1:]
    assert [len(r["input_ids"]) for r in tp2] == [4]
    assert tp2[0]["sampling_params"]["temperature"] == 0.0
    assert tp2[0]["input_ids"] == results[0]["tp2"]["prompts"] == results[1]["tp2"]["prompts"]
    assert torch.equal(results[0]["tp2"]["tokens"], results[1]["tp2"]["tokens"])
    assert results[0]["tp2"]["metrics"]["weight_sync_seconds"] > 0
    # DP2: one request per DP rank and iteration, each with that rank's own prompts.
    assert len(dp2) == 6 and all(len(r["input_ids"]) == 2 for r in dp2)
    assert sorted(map(str, [r["input_ids"] for r in dp2[:2]])) == sorted(
        str(r["dp2_it0"]["prompts"]) for r in results)
    assert results[0]["dp2_it0"]["prompts"] != results[1]["dp2_it0"]["prompts"]
    assert [r["dp2_it1_sync"] for r in results] == [0.0, 0.0]
    assert results[0]["dp2_it2"]["metrics"]["weight_sync_seconds"] > 0
    assert results[0]["exports"] == ["step_0000000", "step_0000002"]


def test_launcher_run_with_the_sglang_backend(engine_setup, standin, tmp_path):
    """Flags -> config -> runner: the start-up line names the backend, every iteration syncs and
    generates through the stand-in, the metrics carry weight_sync_seconds."""
    from tests.distributed.test_launcher import _torchrun

    server, url = standin()
    metrics, weights = tmp_path / "metrics.jsonl", tmp_path / "weights"
    proc = _torchrun(
        1, "--load", engine_setup["hf"], "--train-data", engine_setup["rows"], "--tokenizer-model",
        engine_setup["tok"], "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "2", "--lr", "1e-3", "--device", "cpu", "--on-policy-fraction", "0.5",
        "--rollouts-per-prompt", "2", "--rollout-max-new-tokens", "6", "--rollout-temperature", "0",
        "--rollout-backend", "sglang", "--sglang-url", url, "--sglang-weights-dir", str(weights),
        "--metrics-file", str(metrics), timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"rollout backend: sglang server at {url}" in proc.stdout
    assert server.update_paths == [str(weights / "step_0000000"), str(weights / "step_0000001")]
    assert [len(r["input_ids"]) for r in server.generate_requests] == [2, 2]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["weight_sync_seconds"] > 0 and r["on_policy_samples"] == 2 for r in records)
