"""Tokenize a JSON Lines file into a Megatron-Core indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

    python -m megatron_distill.data.preprocess --input FILE.jsonl [--json-key text] \\
        --tokenizer-model DIR --output-prefix PREFIX [--append-eod]

One document per line (the string under ``--json-key``), tokenized without special tokens
(``add_special_tokens=False``); ``--append-eod`` ends each document with the tokenizer's EOS id,
which ``IndexedBatches(reset_at_document_boundaries=True)`` needs to find document boundaries.
Token dtype: uint16 when the vocabulary has fewer than 65,500 ids, else int32
(``DType.optimal_dtype``). Blank lines and documents with no tokens are skipped and counted.
Outputs are written under temporary names and renamed at the end, so a failed run leaves none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy

_TOKENIZE_BATCH = 1000


def preprocess(
    input_path: str | Path,
    tokenizer: Any,
    output_prefix: str | Path,
    json_key: str = "text",
    append_eod: bool = False,
    log_interval: int = 10000,
    log: Any = None,
) -> dict[str, int]:
    """Write ``output_prefix``.bin/.idx from ``input_path``; returns counts (documents, tokens, skipped).

    A progress line goes to ``log`` (default: stderr) every ``log_interval`` documents (0: none).
    Raises ``ValueError`` naming the file and 1-based line of a line that is not a JSON object
    with a string under ``json_key``.
    """
    log = sys.stderr if log is None else log
    batch_size = min(_TOKENIZE_BATCH, log_interval) if log_interval > 0 else _TOKENIZE_BATCH
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    input_path, output_prefix = Path(input_path), str(output_prefix)
    if not input_path.is_file():
        raise ValueError(f"--input {str(input_path)!r} does not exist")
    eod = tokenizer.eos_token_id
    if append_eod and eod is None:
        raise ValueError("--append-eod: the tokenizer has no eos token")
    vocab = max(tokenizer.get_vocab().values()) + 1
    dtype = DType.optimal_dtype(vocab)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    tmp_bin, tmp_idx = bin_path + ".tmp", idx_path + ".tmp"
    counts = {"documents": 0, "tokens": 0, "skipped_empty": 0}
    start, total_bytes = time.monotonic(), input_path.stat().st_size
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    last_report = 0
    try:
        with input_path.open("rb") as f:
            texts: list[str] = []
            read_bytes = 0
            for lineno, raw in enumerate(f, start=1):
                read_bytes += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{input_path}: line {lineno}: not UTF-8 text ({exc.reason})") from exc
                if line.strip():
                    texts.append(_text_of(line, input_path, lineno, json_key))
                else:
                    counts["skipped_empty"] += 1
                if len(texts) == batch_size:
                    _add_documents(builder, tokenizer, texts, eod if append_eod else None, counts)
                    texts = []
                    if log_interval and counts["documents"] // log_interval != last_report:
                        last_report = counts["documents"] // log_interval
                        elapsed = time.monotonic() - start
                        print(
                            f"[preprocess] {counts['documents']:,} documents, {counts['tokens']:,} tokens, "
                            f"{read_bytes / max(total_bytes, 1):.0%} of {input_path.name}, "
                            f"{counts['documents'] / elapsed:,.0f} docs/s",
                            file=log,
                            flush=True,
                        )
            _add_documents(builder, tokenizer, texts, eod if append_eod else None, counts)
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        raise
    print(
        f"[preprocess] wrote {bin_path} and {idx_path}: {counts['documents']:,} documents, "
        f"{counts['tokens']:,} tokens ({numpy.dtype(dtype).name}), {counts['skipped_empty']} empty line(s) skipped",
        file=log,
        flush=True,
    )
    return counts


def _add_documents(builder: Any, tokenizer: Any, texts: list[str], eod: int | None, counts: dict[str, int]) -> None:
    """Tokenize a batch of documents (one fast-tokenizer call) and append them to ``builder``."""
    if not texts:
        return
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = list(ids) + ([eod] if eod is not None else [])
        if not ids:
            counts["skipped_empty"] += 1
            continue
        builder.add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])
        counts["documents"] += 1
        counts["tokens"] += len(ids)


def _text_of(line: str, path: Path, lineno: int, json_key: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {lineno}: not valid JSON: {exc.msg}") from exc
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
    if json_key not in row:
        raise ValueError(f"{path}: line {lineno}: missing key {json_key!r} (--json-key)")
    if not isinstance(row[json_key], str):
        raise ValueError(f"{path}: line {lineno}: {json_key!r} must be a string, got {type(row[json_key]).__name__}")
    return row[json_key]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a data or tokenizer error)."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_distill.data.preprocess", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--input", required=True, help="JSON Lines file, one document per line")
    parser.add_argument("--json-key", default="text", help="key of the document text in each line (default: text)")
    parser.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    parser.add_argument("--tokenizer-model", required=True, help="local Hugging Face tokenizer directory")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOS token")
    parser.add_argument("--log-interval", type=int, default=10000, help="progress line every N documents")
    args = parser.parse_args(argv)
    from megatron_distill.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model)
        preprocess(args.input, tokenizer, args.output_prefix, args.json_key, args.append_eod, args.log_interval)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
