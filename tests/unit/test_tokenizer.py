"""Local tokenizer loading and the student/teacher tokenizer agreement check."""

from __future__ import annotations

import pytest

from megatron_distill.data.tokenizer import check_tokenizer_fits_model, check_tokenizers_agree, load_tokenizer
from tests.unit.data_fixtures import WORDS, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("toks")
    swapped = list(WORDS)
    swapped[WORDS.index("dog")] = "wolf"
    return {
        "ref": make_tiny_tokenizer(base / "ref"),
        "same": make_tiny_tokenizer(base / "same"),
        "changed_token": make_tiny_tokenizer(base / "changed", words=swapped),
        "other_eos": make_tiny_tokenizer(base / "eos", eos_token="<|system|>"),
        "bigger": make_tiny_tokenizer(base / "bigger", extra_words=["zebra", "yak"]),
        "no_template": make_tiny_tokenizer(base / "notpl", chat_template=None),
    }


def _load(path):
    return load_tokenizer("HuggingFaceTokenizer", path)


def test_load_round_trip(tok_dirs):
    tok = _load(tok_dirs["ref"])
    expected = [7 + WORDS.index(w) for w in ("the", "cat", "sat")]
    assert tok("the cat sat", add_special_tokens=False)["input_ids"] == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 1)
    assert tok.chat_template


def test_identical_tokenizers_agree(tok_dirs):
    check_tokenizers_agree(_load(tok_dirs["ref"]), _load(tok_dirs["same"]))


def test_changed_token_is_named(tok_dirs):
    with pytest.raises(ValueError) as err:
        check_tokenizers_agree(_load(tok_dirs["ref"]), _load(tok_dirs["changed_token"]))
    msg = str(err.value)
    dog_id = 7 + WORDS.index("dog")
    assert f"id {dog_id}: student 'dog' vs teacher 'wolf'" in msg
    assert "vocabulary size" not in msg


def test_different_eos_is_named(tok_dirs):
    expected = r"eos token differs: student '</s>' \(id 3\), teacher '<\|system\|>' \(id 6\)"
    with pytest.raises(ValueError, match=expected):
        check_tokenizers_agree(_load(tok_dirs["ref"]), _load(tok_dirs["other_eos"]))


def test_different_vocab_size_is_named(tok_dirs):
    n = len(_load(tok_dirs["ref"]).get_vocab())
    with pytest.raises(ValueError) as err:
        check_tokenizers_agree(_load(tok_dirs["ref"]), _load(tok_dirs["bigger"]))
    assert f"vocabulary size differs: student {n}, teacher {n + 2}" in str(err.value)
    assert "'zebra'" in str(err.value)


def test_chat_template_presence_is_named(tok_dirs):
    expected = "chat template: the student tokenizer has one, the teacher tokenizer has none"
    with pytest.raises(ValueError, match=expected):
        check_tokenizers_agree(_load(tok_dirs["ref"]), _load(tok_dirs["no_template"]))


def test_missing_dir_and_hub_name_are_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"--tokenizer-model .*nope.*does not exist"):
        load_tokenizer("HuggingFaceTokenizer", missing)
    with pytest.raises(ValueError, match="hub name"):
        load_tokenizer("HuggingFaceTokenizer", "meta-llama/Llama-3.1-8B")
    with pytest.raises(ValueError, match="--teacher-tokenizer-model"):
        load_tokenizer("HuggingFaceTokenizer", missing, flag="--teacher-tokenizer-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a Hugging Face tokenizer"):
        load_tokenizer("HuggingFaceTokenizer", tmp_path / "empty")
    with pytest.raises(ValueError, match="--tokenizer-type"):
        load_tokenizer("SentencePieceTokenizer", tmp_path)


def test_tokenizer_fits_model(tok_dirs):
    tok = _load(tok_dirs["ref"])
    check_tokenizer_fits_model(tok, len(tok.get_vocab()))
    with pytest.raises(ValueError, match="--vocab-size"):
        check_tokenizer_fits_model(tok, len(tok.get_vocab()) - 1)
