"""Tokenizers from local directories, and the student/teacher agreement check.

Distillation compares two token distributions position by position, so student and teacher must
read the same token ids: ``check_tokenizers_agree`` refuses a pair whose vocabularies, special
tokens or chat templates differ, and says where. Only local directories are loaded (no hub
access): ``save_pretrained`` output, or a model directory holding ``tokenizer.json`` /
``tokenizer_config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_TYPES = ("HuggingFaceTokenizer",)
SPECIAL_TOKENS = ("bos", "eos", "pad")
MAX_LISTED_DIFFERENCES = 5


def load_tokenizer(tokenizer_type: str, tokenizer_model: str | Path, flag: str = "--tokenizer-model") -> Any:
    """Load a tokenizer from a local directory (``transformers.AutoTokenizer``, no hub access).

    ``tokenizer_type``: only ``HuggingFaceTokenizer``. ``flag`` names the flag the path came from
    (``--tokenizer-model`` or ``--teacher-tokenizer-model``) in error messages. Raises
    ``ValueError`` for an unknown type, a missing directory (a hub name is not downloaded) or a
    directory transformers cannot read.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {TOKENIZER_TYPES}")
    path = Path(tokenizer_model).expanduser()
    if not path.is_dir():
        hint = ""
        if not path.exists() and len(str(tokenizer_model).split("/")) == 2 and not str(tokenizer_model).startswith("."):
            hint = (
                " It looks like a Hugging Face hub name: hub downloads are not done here; download it first "
                "(e.g. `huggingface-cli download NAME --local-dir DIR`) and pass the local directory."
            )
        what = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(f"{flag} {str(tokenizer_model)!r}: {what} (a local tokenizer directory is required).{hint}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / KeyError depending on what is missing
        raise ValueError(
            f"{flag} {str(tokenizer_model)!r}: could not load a Hugging Face tokenizer from this directory "
            f"(expected tokenizer.json and/or tokenizer_config.json): {type(exc).__name__}: {exc}"
        ) from exc


def pad_token_id(tokenizer: Any) -> int:
    """Id used to fill padding positions: the pad token, else eos, else 0 (always loss-masked)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def check_tokenizers_agree(student_tok: Any, teacher_tok: Any, max_listed: int = MAX_LISTED_DIFFERENCES) -> None:
    """Raise ``ValueError`` listing every way the two tokenizers would map text differently.

    Compared: vocabulary size (``len(get_vocab())``), the bos/eos/pad tokens (string and id), the
    first ``max_listed`` token ids whose strings differ, and chat-template presence and equality.
    Returns ``None`` when they agree.
    """
    problems: list[str] = []
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if len(s_vocab) != len(t_vocab):
        problems.append(f"vocabulary size differs: student {len(s_vocab)}, teacher {len(t_vocab)}")
    for name in SPECIAL_TOKENS:
        s = (getattr(student_tok, f"{name}_token"), getattr(student_tok, f"{name}_token_id"))
        t = (getattr(teacher_tok, f"{name}_token"), getattr(teacher_tok, f"{name}_token_id"))
        if s != t:
            problems.append(f"{name} token differs: student {s[0]!r} (id {s[1]}), teacher {t[0]!r} (id {t[1]})")
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    differing = [i for i in sorted(set(s_by_id) | set(t_by_id)) if s_by_id.get(i) != t_by_id.get(i)]
    if differing:
        listed = ", ".join(
            f"id {i}: student {s_by_id.get(i)!r} vs teacher {t_by_id.get(i)!r}" for i in differing[:max_listed]
        )
        more = f" (and {len(differing) - max_listed} more)" if len(differing) > max_listed else ""
        problems.append(f"{len(differing)} token id(s) map to different strings: {listed}{more}")
    s_tpl, t_tpl = getattr(student_tok, "chat_template", None), getattr(teacher_tok, "chat_template", None)
    if (s_tpl is None) != (t_tpl is None):
        has, lacks = ("student", "teacher") if s_tpl is not None else ("teacher", "student")
        problems.append(f"chat template: the {has} tokenizer has one, the {lacks} tokenizer has none")
    elif s_tpl != t_tpl:
        problems.append("chat templates differ (same conversation would be rendered differently)")
    if problems:
        raise ValueError(
            "student and teacher tokenizers disagree (--tokenizer-model vs --teacher-tokenizer-model):\n  "
            + "\n  ".join(problems)
        )


def check_tokenizer_fits_model(tokenizer: Any, vocab_size: int, flag: str = "--vocab-size") -> None:
    """Raise ``ValueError`` if some token id of ``tokenizer`` is >= the model's ``vocab_size``."""
    needed = max(tokenizer.get_vocab().values(), default=-1) + 1
    if needed > vocab_size:
        raise ValueError(
            f"{flag} ({vocab_size}) is smaller than the tokenizer's vocabulary (ids up to {needed - 1}): "
            f"set {flag} >= {needed}"
        )
