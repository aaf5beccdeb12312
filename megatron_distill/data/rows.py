"""Reading and validating prompt/response and chat rows from local files.

Formats (by extension): ``.jsonl`` (one JSON object per line; blank lines ignored), ``.json`` (a
top-level list of objects, or JSON Lines), ``.parquet`` and ``.arrow`` (read with ``datasets``),
or a directory written by ``datasets.Dataset.save_to_disk``. JSON is parsed with the standard
library rather than ``datasets``' JSON builder: Arrow schema inference rejects a file with one
odd row as a whole, while here every row is checked on its own and a bad one is reported by
file and row index.

A row is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the
assistant's response, or ``{"prompt": str, "response": str}``; optional ``privileged_context``
and ``reference`` strings are carried through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPTIONAL_FIELDS = ("privileged_context", "reference")


class MalformedRowError(ValueError):
    """A row that cannot be used; the message names the file, the 0-based row index and the problem."""


@dataclass
class Row:
    """One validated row. Exactly one of ``messages`` / (``prompt``, ``response``) is set."""

    source: str  # "FILE: row N (0-based)[, line L]"
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    response: str | None = None
    privileged_context: str | None = None
    reference: str | None = None

    def as_messages(self) -> list[dict[str, str]]:
        """The row as a conversation (a prompt/response row is one user and one assistant turn)."""
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


def _where(path: Path, index: int, line: int | None = None) -> str:
    return f"{path}: row {index} (0-based)" + (f", line {line}" if line is not None else "")


def iter_raw_rows(path: str | Path, cache_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw_row)`` for every row of one file; a JSON syntax error is a ``MalformedRowError``
    yielded in place of the row (so ``skip_malformed`` can skip it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

        for i, row in enumerate(datasets.load_from_disk(str(path))):
            yield _where(path, i), row
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if suffix == ".json" and head.startswith("["):
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise MalformedRowError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
            for i, row in enumerate(rows):
                yield _where(path, i), row
            return
        index = 0
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = _where(path, index, lineno)
                index += 1
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, MalformedRowError(f"{where}: not valid JSON: {exc.msg}")
    elif suffix in (".parquet", ".arrow"):
        import datasets

        if suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
        for i, row in enumerate(ds):
            yield _where(path, i), row
    else:
        raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json, .parquet or .arrow)")


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None  # columnar files fill absent fields with None


def parse_row(where: str, raw: Any) -> Row:
    """Validate one raw row; raises ``MalformedRowError`` naming ``where`` and the problem."""
    if isinstance(raw, MalformedRowError):
        raise raw
    if not isinstance(raw, dict):
        raise MalformedRowError(f"{where}: expected an object, got {type(raw).__name__}")
    extra = {}
    for key in OPTIONAL_FIELDS:
        if _present(raw, key):
            if not isinstance(raw[key], str):
                raise MalformedRowError(f"{where}: field {key!r} must be a string, got {type(raw[key]).__name__}")
            extra[key] = raw[key]
    if _present(raw, "messages"):
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MalformedRowError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise MalformedRowError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
            clean.append({k: v for k, v in m.items() if v is not None})
        if clean[-1]["role"] != "assistant":
            raise MalformedRowError(
                f"{where}: the last message must be the assistant's response, got role {clean[-1]['role']!r}"
            )
        if len(clean) < 2:
            raise MalformedRowError(f"{where}: 'messages' needs at least one message before the assistant's response")
        if not clean[-1]["content"].strip():
            raise MalformedRowError(f"{where}: empty response (the last assistant message has no content)")
        return Row(source=where, messages=clean, **extra)
    if not (_present(raw, "prompt") and _present(raw, "response")):
        missing = [k for k in ("prompt", "response") if not _present(raw, k)]
        raise MalformedRowError(
            f"{where}: missing field(s) {missing}: a row needs 'messages' or both 'prompt' and 'response'"
        )
    for key in ("prompt", "response"):
        if not isinstance(raw[key], str):
            raise MalformedRowError(f"{where}: field {key!r} must be a string, got {type(raw[key]).__name__}")
    if not raw["response"].strip():
        raise MalformedRowError(f"{where}: empty response")
    return Row(source=where, prompt=raw["prompt"], response=raw["response"], **extra)
