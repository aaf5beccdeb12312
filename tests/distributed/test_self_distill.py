"""Privileged-context self-distillation: alignment of the two views, and the engine's modes.

* Alignment (no processes): the teacher's input is the student's ids with the context block
  spliced before the prompt; for every position in the loss, the teacher position it is mapped
  to holds the same token and predicts the same label. Checked with a byte-level BPE tokenizer
  trained in the test (a context ending mid-word) and with a chat template; rows without a
  privileged context map to themselves and are counted.
* Engine (torchrun, gloo): ``--teacher self-live`` and ``--teacher self-frozen`` give identical
  losses at step 0; TP=2 and PP=2 equal TP=1 (float32 reduction order only: 1e-5 relative);
  the student's kd_loss falls.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.test_hf_distill_e2e import setup  # noqa: F401  (fixture)
from tests.distributed.test_launcher import _torchrun
from tests.unit.data_fixtures import make_tiny_tokenizer, write_rows


def _bpe_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the solution is forty two", "so the answer is two", "what is six times seven",
              "solutions and answers", "forty", "seven times six is forty two"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _check_alignment(batches, with_context: list[bool]):
    rows = 0
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            tokens, labels, mask = batch["tokens"][b], batch["labels"][b], batch["loss_mask"][b]
            t_tokens, index = batch["teacher_tokens"][b], batch["teacher_index"][b]
            s = tokens.numel()
            for t in torch.nonzero(mask).flatten().tolist():
                j = int(index[t])
                assert j >= 0 and t_tokens[j] == tokens[t]
                if j + 1 < s and t + 1 < s:
                    assert t_tokens[j + 1] == labels[t] or mask[t + 1] == 0
            offset = int(index[0]) if index[0] >= 0 else None
            assert (offset == 0) != with_context[rows], (rows, offset)
            rows += 1


def test_views_align_with_bpe_context_ending_mid_word(tmp_path):
    from megatron_distill.data.chat import ChatBatches

    tok = _bpe_tokenizer(tmp_path / "bpe")
    rows = [{"prompt": "what is six times seven", "response": " forty two", "privileged_context": "the soluti"},
            {"prompt": "so the answer is", "response": " two", "privileged_context": "forty two is the sol"},
            {"prompt": "what is six", "response": " six"}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    data = ChatBatches(path, tok, seq_length=24, global_batch_size=3, micro_batch_size=3, seed=0,
                       privileged_template="{context}")
    batches = data.get(0)
    order = [m["source"] for m in batches[0]["meta"]]
    with_context = [("row 2 " not in src) for src in order]
    _check_alignment(batches, with_context)
    assert data.stats.no_privileged_context == 1


def test_views_align_with_a_chat_template(tmp_path):
    from megatron_distill.data.chat import ChatBatches
    from megatron_distill.data.tokenizer import load_tokenizer

    tok = load_tokenizer("HuggingFaceTokenizer", str(make_tiny_tokenizer(tmp_path / "tok")))
    rows = [{"messages": [{"role": "user", "content": "what is it"}, {"role": "assistant", "content": "a cat"}],
             "privileged_context": "the answer is a cat"},
            {"messages": [{"role": "user", "content": "where is the dog"},
                          {"role": "assistant", "content": "under the tree"}]}]
    data = ChatBatches(write_rows(tmp_path / "rows.jsonl", rows), tok, seq_length=32, global_batch_size=2,
                       micro_batch_size=2, seed=0, privileged_template="answer {context} please")
    batches = data.get(0)
    _check_alignment(batches, [m["privileged_context"] is not None for m in batches[0]["meta"]])


@pytest.fixture(scope="module")
def peaky_student(setup):  # noqa: F811
    """The e2e student with a 20x output layer: a random model whose next-token distribution depends
    visibly on its context (at default init it is nearly uniform whatever the input)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, student, _, _ = setup
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    path = root / "peaky_student"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(student)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def self_data(setup):  # noqa: F811
    root = setup[0]
    rows = []
    words = "the cat sat on a mat and the dog ran under the tree".split()
    for i in range(24):
        response = " ".join(words[i % 5: i % 5 + 4])
        row = {"prompt": " ".join(words[(i + 3) % 7:(i + 3) % 7 + 3]), "response": response}
        if i % 4:
            row["privileged_context"] = response  # the worked solution: the teacher sees the answer
        rows.append(row)
    return write_rows(root / "self.jsonl", rows)


def _self_run(setup, data, student, mode: str, nproc: int, *layout: str, iters: int = 3,  # noqa: F811
              lr: str = "5e-3", global_batch: int = 4):
    root = setup[0]
    metrics = root / f"self_{mode}_{nproc}_{'_'.join(layout)}_{iters}_{global_batch}.jsonl"
    metrics.unlink(missing_ok=True)  # --metrics-file appends
    proc = _torchrun(
        nproc, "--load", str(student), "--teacher", mode, "--train-data", str(data),
        "--privileged-template", "answer {context} please", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", str(global_batch), "--train-iters", str(iters), "--lr", lr,
        "--lr-decay-style", "constant",
        "--device", "cpu", "--metrics-file", str(metrics), *layout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "self-distillation: teacher =" in proc.stdout
    return [json.loads(line)["kd_loss"] for line in metrics.read_text().splitlines()]


def test_self_live_and_self_frozen_agree_at_step_0_and_learn(setup, self_data, peaky_student):  # noqa: F811
    # The whole data set (24 rows) every iteration, so the loss is comparable across iterations.
    frozen = _self_run(setup, self_data, peaky_student, "self-frozen", 1, iters=6, lr="5e-4", global_batch=24)
    live = _self_run(setup, self_data, peaky_student, "self-live", 1, iters=1, global_batch=24)
    assert frozen[0] > 1e-3, "the privileged context changes nothing: the test would prove nothing"
    assert live[0] == pytest.approx(frozen[0], rel=1e-6)
    assert frozen[-1] < 0.7 * frozen[0], frozen


def test_self_distillation_tp2_and_pp2_equal_tp1(setup, self_data, peaky_student):  # noqa: F811
    tp1 = _self_run(setup, self_data, peaky_student, "self-frozen", 1)
    tp2 = _self_run(setup, self_data, peaky_student, "self-frozen", 2, "--tensor-model-parallel-size", "2")
    pp2 = _self_run(setup, self_data, peaky_student, "self-live", 2, "--pipeline-model-parallel-size", "2")
    live1 = _self_run(setup, self_data, peaky_student, "self-live", 1)
    torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=0)
    torch.testing.assert_close(pp2, live1, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- with on-policy rollouts

class _Group:
    def __init__(self, rank: int = 0, size: int = 1):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _stub_generate(vocab: list[int], eos: int):
    """A stand-in for rollout.generate: per row a response of 1..7 tokens drawn from ``vocab``
    (seeded by the prompt), ending with EOS on odd rows, right-padded like generate()'s output."""
    from megatron_distill.rollout.generate import GenerationOutput

    def generate(model, prompts, params, *, vocab_size, pg, prompt_lengths, pad_token_id):
        rows, lengths = [], []
        for r in range(prompts.shape[0]):
            p = int(prompt_lengths[r])
            g = torch.Generator().manual_seed(int(prompts[r, :p].sum()) * 7 + r)
            n = min(params.max_new_tokens, int(torch.randint(1, 8, (1,), generator=g)))
            resp = [vocab[int(i)] for i in torch.randint(0, len(vocab), (n,), generator=g)]
            if r % 2:
                resp[-1] = eos
            rows.append(prompts[r, :p].tolist() + resp)
            lengths.append(n)
        width = max(len(x) for x in rows)
        tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, ids in enumerate(rows):
            tokens[r, : len(ids)] = torch.tensor(ids)
            mask[r, int(prompt_lengths[r]): len(ids)] = True
        resp_len = torch.tensor(lengths)
        return GenerationOutput(tokens, mask, prompt_lengths.clone(), resp_len, resp_len == params.max_new_tokens, 0.0)

    return generate


def test_on_policy_rollouts_get_the_privileged_teacher_view(tmp_path, monkeypatch):
    """Student rollouts under self-distillation: each generated row's teacher input is
    [bos] + context block + prompt + generated response, aligned token for token on every loss
    position; the row takes its group's first row's context and reference; rows past
    --seq-length leave the loss only where the teacher's view no longer fits."""
    from types import SimpleNamespace

    from megatron_distill import onpolicy
    from megatron_distill.config import RolloutConfig
    from megatron_distill.data.chat import ChatBatches
    from megatron_distill.data.privileged import context_ids, teacher_view
    from megatron_distill.data.tokenizer import load_tokenizer

    tok = load_tokenizer("HuggingFaceTokenizer", str(make_tiny_tokenizer(tmp_path / "tok")))
    words = "the cat sat on a mat and the dog ran under the tree".split()
    rows = []
    for i in range(8):
        row = {"prompt": " ".join(words[i % 6: i % 6 + 3]), "response": " ".join(words[i % 4: i % 4 + 2]),
               "reference": str(i)}
        if i % 2:
            row["privileged_context"] = " ".join((words * 3)[i: i + 2 + 2 * i])  # 4..16 words
        rows.append(row)
    template = "answer {context} please"
    seq = 24
    path = write_rows(tmp_path / "rows.jsonl", rows)

    def source():
        return ChatBatches(path, tok, seq_length=seq, global_batch_size=8, micro_batch_size=4, seed=0,
                           privileged_template=template)

    plain_meta = [m for b in source().get(0) for m in b["meta"]]
    data = source()

    vocab_ids = tok.convert_tokens_to_ids(words)
    monkeypatch.setattr(onpolicy, "generate", _stub_generate(vocab_ids, tok.eos_token_id))
    monkeypatch.setattr(onpolicy.OnPolicyData, "_record", lambda self, *times: None)  # its all-reduce
    model = SimpleNamespace(position_embedding_type="rope", max_sequence_length=64)
    engine = SimpleNamespace(pg=SimpleNamespace(dp=_Group(), tp=_Group(), pp=_Group()),
                             stage=SimpleNamespace(student=model, teacher=None),
                             cfg=SimpleNamespace(student=SimpleNamespace(vocab_size=len(tok))))
    cfg = RolloutConfig(on_policy_fraction=1.0, rollouts_per_prompt=2, max_new_tokens=7)
    wrapped = onpolicy.OnPolicyData(data, engine, tok, cfg, device=torch.device("cpu"))
    batches = wrapped.get(0)

    meta = [m for b in batches for m in b["meta"]]
    (rollout,) = wrapped.last_rollouts
    assert sorted(rollout.slots) == list(range(8))
    cut = 0
    with_context = []
    for r, slot in enumerate(rollout.slots):
        first = plain_meta[slot - slot % 2]
        assert meta[slot]["reference"] == first["reference"] and meta[slot]["rollout"] == "student"
        block = context_ids(tok, template, first["privileged_context"]) if first["privileged_context"] else []
        assert meta[slot]["context_ids"] == block
        with_context.append(bool(block))
        mb, j = batches[slot // 4], slot % 4
        n = int(rollout.output.lengths[r])
        full = rollout.output.tokens[r, :n]
        want, offset = teacher_view(full, block, tok.bos_token_id)
        want = want[:-1][:seq]
        assert torch.equal(mb["teacher_tokens"][j, : want.numel()], want)
        # Loss positions: the generated tokens whose teacher position fits in the row.
        generated = rollout.output.response_mask[r, 1:n].nonzero().flatten()
        kept = generated[generated + offset < seq]
        cut += generated.numel() - kept.numel()
        assert mb["loss_mask"][j].nonzero().flatten().tolist() == kept.tolist()
    assert cut > 0, "no teacher view ran past --seq-length: the truncation rule is untested"
    assert any(with_context) and not all(with_context)
    _check_alignment(batches, with_context)


def test_on_policy_self_distillation_layouts_agree(setup, self_data, peaky_student):  # noqa: F811
    """Student rollouts scored by the privileged self-teacher, through the engine: TP=2 equals TP=1
    (self-frozen, 2 iterations), PP=2 self-live equals TP=1 self-frozen at step 0."""
    on = ("--on-policy-fraction", "1.0", "--rollout-max-new-tokens", "6", "--rollout-temperature", "1.0")
    tp1 = _self_run(setup, self_data, peaky_student, "self-frozen", 1, *on, iters=2)
    tp2 = _self_run(setup, self_data, peaky_student, "self-frozen", 2, "--tensor-model-parallel-size", "2", *on,
                    iters=2)
    pp2 = _self_run(setup, self_data, peaky_student, "self-live", 2, "--pipeline-model-parallel-size", "2", *on,
                    iters=1)
    assert tp1[0] > 1e-3, "the privileged context changes nothing: the test would prove nothing"
    torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=0)
    torch.testing.assert_close(pp2[0], tp1[0], rtol=1e-5, atol=0)
