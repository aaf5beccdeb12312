"""Privileged-context self-distillation: the teacher's view of a sample.

The teacher sees extra context (e.g. a worked solution) that the student does not. The teacher's
input is the student's token ids with the context block spliced in before the prompt::

    student:  [bos] prompt response
    teacher:  [bos] <template(context)> prompt response

The context block is tokenized on its own and the student's ids are reused verbatim, so the
prompt and response tokens of both views are identical and aligned exactly: student position t
and teacher position t + offset predict the same next token (offset = the block's length). A
context that ends mid-word or a chat template cannot shift the response. Rows without
privileged context get the student's input unchanged (offset 0) and are counted.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_PRIVILEGED_TEMPLATE = "Reference solution (for the teacher only):\n{context}\n\n"


def context_ids(tokenizer: Any, template: str, context: str) -> list[int]:
    """Token ids of the privileged block ``template.format(context=context)`` (no special tokens)."""
    if "{context}" not in template:
        raise ValueError(f"--privileged-template must contain '{{context}}', got {template!r}")
    return list(tokenizer(template.format(context=context), add_special_tokens=False)["input_ids"])


def teacher_view(ids: torch.Tensor, block: list[int], bos_token_id: int | None) -> tuple[torch.Tensor, int]:
    """The teacher's ids ``[n + len(block)]`` for the student's ids ``[n]``, and the offset.

    The block goes after a leading BOS (if the student's ids start with one), else first.
    """
    if not block:
        return ids, 0
    split = 1 if bos_token_id is not None and ids.numel() and int(ids[0]) == bos_token_id else 0
    return torch.cat([ids[:split], torch.tensor(block, dtype=ids.dtype), ids[split:]]), len(block)


def teacher_fields(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, block: list[int],
                   bos_token_id: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Per-sample teacher tensors for one ``[s]`` row.

    Returns ``teacher_tokens`` [s] (the teacher's ids, truncated / padded to s),
    ``teacher_position_ids`` [s] and ``teacher_index`` [s] long: for student position t, the
    teacher position predicting the same label (t + offset), or -1 where that falls past the
    row (such positions are removed from the loss by the caller via ``loss_mask``).
    """
    s = tokens.numel()
    full = torch.cat([tokens, labels[-1:]])  # the student's n + 1 ids
    t_ids, offset = teacher_view(full, block, bos_token_id)
    t_tokens = t_ids[:-1][:s]
    if t_tokens.numel() < s:
        t_tokens = torch.cat([t_tokens, torch.full((s - t_tokens.numel(),), pad_id, dtype=t_tokens.dtype)])
    index = torch.arange(s) + offset
    index = torch.where(index < s, index, torch.full_like(index, -1))
    return {"teacher_tokens": t_tokens, "teacher_position_ids": torch.arange(s), "teacher_index": index}
