"""Shared test helpers for data tests: a tiny local Hugging Face tokenizer and small data files.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over a fixed word list
(whitespace pre-tokenizer), wrapped in ``PreTrainedTokenizerFast`` with bos/eos/pad/unk and
role markers as special tokens and a one-line Jinja chat template, saved with
``save_pretrained``. Use it from any test (on-policy, self-distillation, ...):

    from tests.unit.data_fixtures import make_tiny_tokenizer
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer("HuggingFaceTokenizer", tok_dir)

Decoding joins words with single spaces, so ``decode(encode(text)) == text`` for text made of
known words separated by single spaces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "the a an cat dog bird fish sat ran flew swam on in under over mat tree sea sky big small red blue "
    "hi hello there what is it where who yes no please thanks answer question why because and or not "
    "one two three four five six seven eight nine ten"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tiny_tokenizer(
    path: str | Path,
    words: Sequence[str] = WORDS,
    eos_token: str = "</s>",
    chat_template: str | None = CHAT_TEMPLATE,
    extra_words: Sequence[str] = (),
) -> Path:
    """Build and ``save_pretrained`` a tiny word-level tokenizer in ``path``; returns ``path``.

    Ids: the special tokens first (``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3, role markers
    4-6), then ``words`` then ``extra_words`` in order. ``eos_token`` may name any token (e.g.
    ``"<pad>"`` to make a tokenizer that disagrees on eos); ``chat_template=None`` leaves none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words, *extra_words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token=eos_token,
        additional_special_tokens=[t for t in SPECIAL_TOKENS[4:] if t != eos_token],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    path = Path(path)
    tok.save_pretrained(str(path))
    return path


def write_rows(path: str | Path, rows: list[Any]) -> Path:
    """Write ``rows`` in the format named by the suffix: .jsonl, .json (a list), .parquet, .arrow."""
    path = Path(path)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif suffix in (".parquet", ".arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        if suffix == ".parquet":
            pq.write_table(table, str(path))
        else:  # Arrow IPC stream, the format of datasets' cache / save_to_disk files
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    else:
        raise ValueError(f"unsupported suffix {suffix}")
    return path


def sample_rows(n: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chat rows of known words, each with ``privileged_context`` and ``reference``."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "answer please"})
        rows.append(
            {"messages": messages, "privileged_context": f"hint {i}", "reference": f"ref {i}"}
        )
    return rows
