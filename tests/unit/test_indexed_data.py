"""Megatron-Core indexed datasets: preprocessing to .bin/.idx, blending, document boundaries, resume."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy
import pytest
import torch

from megatron_distill.data.indexed import IndexedBatches, parse_data_path
from megatron_distill.data.preprocess import main as preprocess_main
from megatron_distill.data.preprocess import preprocess
from megatron_distill.data.tokenizer import load_tokenizer
from tests.unit.data_fixtures import WORDS, make_tiny_tokenizer

EOD = 3  # "</s>" in the tiny tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "t")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer("HuggingFaceTokenizer", tok_dir)


def _docs(words, n, seed):
    rng = numpy.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(n)]


def _write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def two_prefixes(tmp_path_factory, tok):
    """Dataset A uses only the first half of WORDS, dataset B only the second half."""
    base = tmp_path_factory.mktemp("idx")
    half = len(WORDS) // 2
    prefixes = []
    for name, words in (("a", WORDS[:half]), ("b", WORDS[half:])):
        src = _write_jsonl(base / f"{name}.jsonl", _docs(words, 60, seed=len(name) + ord(name)))
        preprocess(src, tok, base / name, append_eod=True, log=io.StringIO())
        prefixes.append(str(base / name))
    return base, prefixes


def test_preprocess_round_trip_exact_ids(tmp_path, tok, tok_dir, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = _docs(WORDS, 25, seed=1)
    src = _write_jsonl(tmp_path / "in.jsonl", texts[:10], key="body")
    with src.open("a") as f:  # a blank line is skipped
        f.write("\n" + "".join(json.dumps({"body": t}) + "\n" for t in texts[10:]))
    rc = preprocess_main(["--input", str(src), "--json-key", "body", "--tokenizer-model", str(tok_dir),
                          "--output-prefix", str(tmp_path / "out" / "docs"), "--append-eod", "--log-interval", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "[preprocess] wrote" in err and "25 documents" in err and "[preprocess] 1 documents" in err
    ds = IndexedDataset(str(tmp_path / "out" / "docs"))
    assert len(ds) == 25 and ds.index.dtype == numpy.uint16
    for i, text in enumerate(texts):
        expected = tok(text, add_special_tokens=False)["input_ids"] + [EOD]
        assert ds[i].tolist() == expected


def test_preprocess_errors_name_file_and_line(tmp_path, tok_dir, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"text": "the cat"}) + "\n" + json.dumps({"txt": "a dog"}) + "\n")
    out = tmp_path / "o"
    rc = preprocess_main(["--input", str(src), "--tokenizer-model", str(tok_dir), "--output-prefix", str(out)])
    assert rc == 2
    assert f"{src}: line 2: missing key 'text'" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*"))  # nothing half-written
    src.write_text("{oops\n")
    assert preprocess_main(["--input", str(src), "--tokenizer-model", str(tok_dir), "--output-prefix", str(out)]) == 2
    assert "line 1: not valid JSON" in capsys.readouterr().err
    assert preprocess_main(["--input", str(src), "--tokenizer-model", str(tmp_path / "x"),
                            "--output-prefix", str(out)]) == 2
    assert "--tokenizer-model" in capsys.readouterr().err


def test_parse_data_path(two_prefixes):
    _, (a, b) = two_prefixes
    assert parse_data_path([a]) == ([a], None)
    assert parse_data_path(["1", a, "3", b]) == ([a, b], [0.25, 0.75])
    assert parse_data_path([a, b]) == ([a, b], None)
    with pytest.raises(ValueError, match=r"--data-path prefix .*nope.*nope.bin and .*nope.idx not found"):
        parse_data_path([a + "nope"])
    with pytest.raises(ValueError, match="weights must be > 0"):
        parse_data_path(["0", a, "1", b])


def _make(prefixes_arg, base, **kw):
    args = dict(seq_length=16, global_batch_size=8, micro_batch_size=2, num_samples=400, eod_token_id=EOD, seed=5,
                cache_dir=base / "cache")
    return IndexedBatches(prefixes_arg, **(args | kw))


def test_single_prefix_batches_follow_the_token_stream(two_prefixes):
    base, (a, _) = two_prefixes
    data = _make([a], base)
    mbs = data.get(0)
    assert len(mbs) == 4
    for mb in mbs:
        assert mb["tokens"].shape == (2, 16) and mb["tokens"].dtype == torch.long
        assert torch.equal(mb["labels"][:, :-1], mb["tokens"][:, 1:])
        assert mb["loss_mask"].eq(1).all() and "attention_mask" not in mb
        assert torch.equal(mb["position_ids"][0], torch.arange(16))
        assert all(m["dataset_id"] == 0 for m in mb["meta"])


def test_blend_respects_weights_deterministically(two_prefixes):
    base, (a, b) = two_prefixes
    half = len(WORDS) // 2
    data = _make(["0.3", a, "0.7", b], base, global_batch_size=40, micro_batch_size=40)
    ids, from_b = [], []
    for it in range(8):  # 320 samples
        mb = data.get(it)[0]
        ids += [m["dataset_id"] for m in mb["meta"]]
        words = mb["tokens"][mb["tokens"] != EOD]
        from_b += [bool((row[row != EOD] >= 7 + half).all()) for row in mb["tokens"]]
        assert words.numel() > 0
    counts = Counter(ids)
    assert abs(counts[1] / len(ids) - 0.7) < 0.01
    assert from_b == [i == 1 for i in ids]  # the tokens really come from the dataset named
    again = _make(["0.3", a, "0.7", b], base, global_batch_size=40, micro_batch_size=40)
    assert torch.equal(again.get(3)[0]["tokens"], data.get(3)[0]["tokens"])


def test_document_boundaries_reset(two_prefixes):
    base, (a, _) = two_prefixes
    mb = _make([a], base, reset_at_document_boundaries=True).get(0)[0]
    tokens, mask, pos, att = mb["tokens"], mb["loss_mask"], mb["position_ids"], mb["attention_mask"]
    assert att.shape == (2, 1, 16, 16)
    assert (tokens == EOD).any()
    for b in range(2):
        for t in range(16):
            is_eod = bool(tokens[b, t] == EOD)
            assert bool(mask[b, t] == 0) == is_eod  # EOD does not predict the next document
            if t + 1 < 16:  # positions restart right after an EOD, else count up
                assert int(pos[b, t + 1]) == (0 if is_eod else int(pos[b, t]) + 1)
        doc_start = (pos[b] == 0).nonzero().flatten().tolist()
        for s in doc_start[1:]:
            assert att[b, 0, s:, :s].all()  # later documents never see earlier ones
        upper = torch.ones(16, 16, dtype=torch.bool).triu(1)
        assert att[b, 0][upper].all()  # causal
        assert len(doc_start) >= 2


def test_dp_slices_and_resume(two_prefixes):
    base, (a, b) = two_prefixes
    blend = ["1", a, "1", b]
    full = _make(blend, base)
    whole = torch.cat([mb["tokens"] for mb in full.get(2)])
    parts = [mb["tokens"] for r in range(2) for mb in _make(blend, base, dp_rank=r, dp_size=2).get(2)]
    assert torch.equal(torch.cat(parts), whole)
    state = json.loads(json.dumps(full.state_dict()))
    assert state["iteration"] == 3 and state["consumed_samples"] == 24 and state["seed"] == 5
    resumed = _make(blend, base, seed=1)
    resumed.load_state_dict(state)
    for it in (3, 4):
        for x, y in zip(full.get(it), resumed.get(it), strict=True):
            assert torch.equal(x["tokens"], y["tokens"]) and x["meta"] == y["meta"]
