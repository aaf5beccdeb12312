"""Sequence packing: several short samples in one ``seq_length`` row, with no leakage between them.

Layout. A sample of ``n + 1`` token ids contributes its ``n`` (input, label) pairs:
``tokens = ids[:-1]``, ``labels = ids[1:]``, ``loss_mask`` of its labels, exactly what it would
be unpacked. Packed samples are laid side by side in these pair slots, so a document's last
input predicts its own last token and never the next document's first token: there is no
cross-document loss by construction (and no slot is spent on a boundary). Each document's
``position_ids`` restart at 0, and the ``attention_mask`` ``[b, 1, s, s]`` (True = masked) is
causal and block-diagonal: a token attends only to earlier tokens of its own document. The
padding at the end of a row is one more block (loss mask 0, labels 0, its own positions), so no
attention row is fully masked (which would give NaN in softmax).

Packing is greedy first-fit: samples are taken in the given order, each goes into the first
row (in creation order) that still has room; deterministic for a given order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def first_fit_pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing: ``bins[k]`` lists the indices (in order) of the items in row k.

    O(n log n): a max segment tree over the rows' free space finds the first row with room.
    Raises ``ValueError`` for an item longer than ``capacity`` or shorter than 1.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * (2 * size)  # leaves: free space of row k (0 until the row is opened)
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        if not 1 <= length <= capacity:
            raise ValueError(f"item {item} has length {length}, outside [1, {capacity}]")
        if free[1] >= length:  # descend to the leftmost open row with room
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= length else 2 * node + 1
            row = node - size
        else:
            row = len(bins)
            bins.append([])
            node = row + size
            free[node] = capacity
        bins[row].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_row(
    samples: Sequence[dict[str, torch.Tensor]], seq_length: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Lay samples side by side in one row of ``seq_length`` slots.

    ``samples``: dicts of 1-D tensors ``tokens`` [n_i] (long), ``labels`` [n_i] (long),
    ``loss_mask`` [n_i] (float), with ``sum(n_i) <= seq_length``. Returns 1-D ``[seq_length]``
    tensors ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (restarting at 0 per sample and
    for the padding) and ``document_ids`` (0, 1, ... per sample; the padding gets ``len(samples)``).
    """
    used = sum(int(s["tokens"].numel()) for s in samples)
    if used > seq_length:
        raise ValueError(f"samples need {used} slots, more than seq_length {seq_length}")
    pad = seq_length - used
    tokens = [s["tokens"].long() for s in samples] + [torch.full((pad,), pad_token_id, dtype=torch.long)]
    labels = [s["labels"].long() for s in samples] + [torch.zeros(pad, dtype=torch.long)]
    loss_mask = [s["loss_mask"].float() for s in samples] + [torch.zeros(pad)]
    lengths = [int(s["tokens"].numel()) for s in samples] + [pad]
    return {
        "tokens": torch.cat(tokens),
        "labels": torch.cat(labels),
        "loss_mask": torch.cat(loss_mask),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        "document_ids": torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(lengths)]),
    }


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal block-diagonal mask ``[b, 1, s, s]`` (True = masked) from ``document_ids`` ``[b, s]``.

    Query i may attend key j iff ``j <= i`` and both belong to the same document.
    """
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)  # [b, s, s]
    return ~(same_doc & causal).unsqueeze(1)


def document_ids_from_eod(tokens: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """Document index of every position of ``tokens`` ``[b, s]``: a new document starts after each EOD.

    ``doc[t]`` = number of EOD tokens in ``tokens[:t]`` (the EOD belongs to the document it ends).
    """
    is_eod = (tokens == eod_token_id).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def collate_packed(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a micro-batch: ``[b, s]`` tensors plus ``attention_mask`` ``[b, 1, s, s]``."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["attention_mask"] = document_attention_mask(torch.stack([r["document_ids"] for r in rows]))
    return batch
