"""Chat / prompt-response datasets: formats, loss masks, malformed rows, DP slicing, resume, packing."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_distill.data.chat import ChatBatches
from megatron_distill.data.tokenizer import load_tokenizer
from tests.unit.data_fixtures import make_tiny_tokenizer, sample_rows, write_rows

TENSOR_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("HuggingFaceTokenizer", make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "t"))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    path = make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "plain", chat_template=None)
    return load_tokenizer("HuggingFaceTokenizer", path)


def _batches(path, tok, tmp_path, **kw):
    args = dict(seq_length=16, global_batch_size=4, micro_batch_size=2, seed=7, cache_dir=str(tmp_path / "hf"))
    return ChatBatches(path, tok, **(args | kw))


def _all_samples(data, iterations=3):
    out = []
    for it in range(iterations):
        for mb in data.get(it):
            out.append(({k: mb[k] for k in TENSOR_KEYS}, mb["meta"]))
    return out


def test_formats_give_identical_samples(tok, tmp_path):
    rows = sample_rows(10)
    results = []
    for suffix in (".jsonl", ".json", ".parquet", ".arrow"):
        path = write_rows(tmp_path / f"rows{suffix}", rows)
        results.append(_all_samples(_batches(path, tok, tmp_path)))
    for other in results[1:]:
        for (t0, m0), (t1, m1) in zip(results[0], other, strict=True):
            for k in TENSOR_KEYS:
                assert torch.equal(t0[k], t1[k]), k
            assert [(m["reference"], m["privileged_context"]) for m in m0] == [
                (m["reference"], m["privileged_context"]) for m in m1
            ]


def test_loss_mask_covers_exactly_the_response(tok, tmp_path):
    rows = sample_rows(9)
    data = _batches(write_rows(tmp_path / "r.jsonl", rows), tok, tmp_path, seq_length=40, global_batch_size=9,
                    micro_batch_size=1)
    seen = 0
    for mb in data.get(0):
        meta = mb["meta"][0]
        row = rows[int(meta["source"].split("row ")[1].split(" ")[0])]
        mask = mb["loss_mask"][0].bool()
        assert tok.decode(mb["labels"][0][mask]) == row["messages"][-1]["content"] + " </s>"
        # Everything before the first masked label is the rendered prompt.
        first = int(mask.nonzero()[0])
        assert tok.decode(mb["tokens"][0][: first + 1]).endswith("<|assistant|>")
        assert meta["reference"] == row["reference"] and meta["privileged_context"] == row["privileged_context"]
        assert mb["labels"][0][~mask][first:].eq(0).all()  # padding labels are 0 (and masked)
        assert mb["tokens"][0][first + int(mask.sum()) :].eq(tok.pad_token_id).all()
        seen += 1
    assert seen == 9


def test_prompt_response_rows_without_chat_template(plain_tok, tmp_path):
    rows = [{"prompt": "what is it", "response": "a big cat", "reference": "r0"}]
    data = _batches(write_rows(tmp_path / "pr.jsonl", rows), plain_tok, tmp_path, global_batch_size=2,
                    micro_batch_size=1)
    mb = data.get(0)[0]
    ids = plain_tok("what is it a big cat", add_special_tokens=False)["input_ids"]
    expected = [plain_tok.bos_token_id, *ids, plain_tok.eos_token_id]
    assert mb["tokens"][0][: len(expected) - 1].tolist() == expected[:-1]
    mask = mb["loss_mask"][0].bool()
    assert plain_tok.decode(mb["labels"][0][mask]) == "a big cat </s>"
    assert mb["meta"][0]["reference"] == "r0" and mb["meta"][0]["privileged_context"] is None


MALFORMED = [
    ([1, 2], "expected an object, got list"),
    ({"text": "hi"}, "missing field"),
    ({"prompt": 3, "response": "yes"}, "'prompt' must be a string"),
    ({"prompt": "hi", "response": ""}, "empty response"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": "hi"}, "non-empty list"),
    ({"prompt": "hi", "response": "yes", "reference": 5}, "'reference' must be a string"),
]


@pytest.mark.parametrize("bad,problem", MALFORMED)
def test_malformed_row_names_file_row_and_problem(tok, tmp_path, bad, problem):
    rows = sample_rows(3)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as err:
        _batches(path, tok, tmp_path, global_batch_size=2, micro_batch_size=1)
    msg = str(err.value)
    assert str(path) in msg and "row 2 (0-based)" in msg and problem in msg


def test_invalid_json_line_and_skip_malformed_counts(tok, tmp_path):
    rows = sample_rows(4)
    lines = [json.dumps(r) for r in rows[:2]] + ["{not json", ""] + [json.dumps(b) for b, _ in MALFORMED]
    lines += [json.dumps(r) for r in rows[2:]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"row 2 \(0-based\), line 3: not valid JSON"):
        _batches(path, tok, tmp_path, global_batch_size=2, micro_batch_size=1)
    data = _batches(path, tok, tmp_path, global_batch_size=2, micro_batch_size=1, skip_malformed=True)
    assert data.stats.skipped_malformed == 1 + len(MALFORMED)
    assert data.stats.samples == 4 and data.stats.rows_read == 4 + 1 + len(MALFORMED)


def test_dp_slices_union_is_the_global_batch(tok, tmp_path):
    path = write_rows(tmp_path / "r.jsonl", sample_rows(11))
    full = _batches(path, tok, tmp_path, global_batch_size=8, micro_batch_size=2)
    for it in (0, 1, 2):  # iteration 1 crosses the epoch boundary (11 rows)
        whole = torch.cat([mb["tokens"] for mb in full.get(it)])
        parts = []
        for rank in range(4):
            shard = _batches(path, tok, tmp_path, global_batch_size=8, micro_batch_size=1, dp_rank=rank, dp_size=4)
            mbs = shard.get(it)
            assert len(mbs) == 2
            parts += [mb["tokens"] for mb in mbs]
        assert torch.equal(torch.cat(parts), whole)


def test_epochs_cover_every_row_once(tok, tmp_path):
    data = _batches(write_rows(tmp_path / "r.jsonl", sample_rows(12)), tok, tmp_path, global_batch_size=4)
    first_epoch = sum((data.global_batch_rows(i) for i in range(3)), [])
    second_epoch = sum((data.global_batch_rows(i) for i in range(3, 6)), [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(12))
    assert first_epoch != second_epoch  # reshuffled per epoch


def test_state_dict_resume_gives_identical_batches(tok, tmp_path):
    path = write_rows(tmp_path / "r.jsonl", sample_rows(10))
    a = _batches(path, tok, tmp_path)
    for it in range(4):
        a.get(it)
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store plain data
    assert state == {"iteration": 4, "consumed_samples": 16, "seed": 7, "epoch": 1, "num_rows": 10}
    b = _batches(path, tok, tmp_path, seed=999)  # the checkpoint's seed wins
    b.load_state_dict(state)
    for it in range(4, 7):
        for x, y in zip(a.get(it), b.get(it), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in TENSOR_KEYS) and x["meta"] == y["meta"]
    # A changed global batch size continues from the consumed samples.
    c = _batches(path, tok, tmp_path, global_batch_size=2, micro_batch_size=1)
    c.load_state_dict(state)
    assert c.global_batch_rows(4) == a.global_batch_rows(4)[:2]
    with pytest.raises(ValueError, match="rows per epoch"):
        _batches(write_rows(tmp_path / "s.jsonl", sample_rows(9)), tok, tmp_path).load_state_dict(state)


def test_truncation_is_counted(tok, tmp_path):
    rows = [{"prompt": "hi", "response": " ".join(["cat"] * 30)}, {"prompt": " ".join(["dog"] * 30), "response": "yes"}]
    rows += [{"prompt": "hi", "response": "yes"}]
    data = _batches(write_rows(tmp_path / "t.jsonl", rows), tok, tmp_path, global_batch_size=2, micro_batch_size=1)
    assert data.stats.truncated == 2 and data.stats.dropped_no_loss == 1 and data.stats.samples == 2
    for it in range(2):
        for mb in data.get(it):
            assert mb["tokens"].shape == (1, 16) and mb["loss_mask"].sum() > 0


def test_packing_option(tok, tmp_path):
    rows = sample_rows(20)
    path = write_rows(tmp_path / "r.jsonl", rows)
    packed = _batches(path, tok, tmp_path, seq_length=48, global_batch_size=2, micro_batch_size=1, pack=True)
    plain = _batches(path, tok, tmp_path, seq_length=48, global_batch_size=2, micro_batch_size=1)
    assert 0 < packed.stats.packed_rows < len(rows)
    mb = packed.get(0)[0]
    assert mb["attention_mask"].shape == (1, 1, 48, 48)
    docs = mb["meta"][0]["documents"]
    assert len(docs) >= 2
    # Each document of the row is exactly its unpacked sample, positions restarting at 0.
    starts = (mb["position_ids"][0] == 0).nonzero().flatten().tolist()
    by_source = {}
    for it in range(10):
        for b in plain.get(it):
            by_source[b["meta"][0]["source"]] = b
    for d, meta in enumerate(docs):
        alone = by_source[meta["source"]]
        n = int((alone["tokens"][0] != tok.pad_token_id).sum())
        sl = slice(starts[d], starts[d] + n)
        assert torch.equal(mb["tokens"][0, sl], alone["tokens"][0, :n])
        assert torch.equal(mb["loss_mask"][0, sl], alone["loss_mask"][0, :n])
        assert mb["attention_mask"][0, 0, sl, : starts[d]].all()  # cannot see earlier documents
    # One epoch of packed rows holds every sample exactly once.
    one = _batches(path, tok, tmp_path, seq_length=48, global_batch_size=1, micro_batch_size=1, pack=True)
    assert one.num_rows == packed.num_rows
    sources = [d["source"] for it in range(one.num_rows) for d in one.get(it)[0]["meta"][0]["documents"]]
    assert sorted(sources) == sorted(by_source) and len(sources) == len(rows)
