"""Vocab-parallel token sampling: greedy, temperature, top-k, top-p, without gathering logits.

Each tensor-parallel rank holds the logits of its vocabulary shard, ``[b, V_local]`` for ids
``[vocab_start, vocab_start + V_local)``. Only per-row winners or a bounded candidate set cross
the TP group:

* greedy (``temperature == 0``): each shard's argmax, then the max over shards (2 all-gathers
  of ``[b]``). Ties go to the smallest vocabulary id, as ``torch.argmax`` on the full vocabulary.
* temperature only (no top-k / top-p): the Gumbel-max trick. ``argmax_v(z_v / T + g_v)`` with
  ``g_v`` i.i.d. standard Gumbel is an exact sample of ``softmax(z / T)``; the argmax is taken per
  shard, then over shards. Exact, and no candidate set at all.
* top-k and/or top-p: each shard sends its own top ``k`` (``k = top_k``, or
  ``max_candidates`` for top-p alone); the global top ``k`` is among them, so top-k is exact.
  With ``top_k`` the nucleus is taken on the top-k distribution renormalised (Hugging Face's
  order: temperature, top-k, then top-p). With top-p alone the probabilities are under the full
  softmax (a vocab-parallel log-sum-exp); the nucleus is exact when the top ``max_candidates``
  tokens hold at least ``top_p`` of the mass, otherwise it is cut to those candidates.
  The kept candidates are then sampled by Gumbel-max.

The Gumbel noise is not drawn from a stateful generator: ``g`` is a counter-based hash of
``(seed, step, row, global vocabulary id)``. Every rank computes the noise of its own ids, the
global RNG is untouched, and the same seed gives the same tokens whatever the TP / PP layout
(up to float rounding of the logits themselves). ``row`` is the sequence's index in the batch,
``step`` the index of the generated token (0 for the first new token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_distill.losses.tp_collectives import (
    ProcessGroup,
    all_gather_dim0,
    all_reduce_max_,
    all_reduce_sum_,
    group_size,
)

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token, and when to stop.

    ``temperature`` 0 is greedy (``top_k`` / ``top_p`` then change nothing). ``top_k`` 0 and
    ``top_p`` 1.0 disable those filters. A sequence finishes after it emits one of
    ``stop_token_ids`` (the stop token is part of the response) or after ``max_new_tokens``.
    ``max_candidates`` bounds the per-shard candidate set of top-p without top-k.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    max_candidates: int = 1024

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _mul32(h, c: int):
    """``(h * c) mod 2**32`` for ``0 <= h, c < 2**32`` without overflowing int64."""
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche); int or int64 tensor."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(seed: int, step: int, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``[b, n]`` (float64) keyed by ``(seed, step, rows[i], ids[i, j])``.

    ``rows`` ``[b]`` and ``ids`` ``[n]`` or ``[b, n]`` are int64. The same key always gives the
    same value, on any rank and in any tensor shape.
    """
    key = _fmix32(_fmix32((seed & _M32) ^ 0x9E3779B9) ^ ((seed >> 32) & _M32))
    key = _fmix32(key ^ (step & _M32))
    row_key = _fmix32(rows.to(torch.int64).unsqueeze(-1) ^ key)  # [b, 1]
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    h = _fmix32(row_key ^ ids.to(torch.int64))
    hi = _fmix32(h ^ 0x5BD1E995)
    lo = _fmix32(h ^ 0x1B873593)
    bits53 = (hi << 21) | (lo >> 11)
    u = (bits53.to(torch.float64) + 0.5) * (1.0 / 2.0**53)  # in (0, 1)
    return -torch.log(-torch.log(u))


def _gather_rows(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``[b, n]`` on each TP rank -> ``[b, tp * n]``: the ranks' columns side by side, in rank order."""
    world = group_size(group)
    if world == 1:
        return tensor
    b, n = tensor.shape
    gathered = all_gather_dim0(tensor.contiguous(), group)  # [tp * b, n]
    return gathered.view(world, b, n).permute(1, 0, 2).reshape(b, world * n)


def _argmax_over_shards(scores: torch.Tensor, ids: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Global id of the row-wise max of ``scores`` ``[b, V_local]`` over all shards -> ``[b]``."""
    best, where = scores.max(dim=-1)  # first occurrence: the smallest id within the shard
    best_ids = ids[where]
    all_best = _gather_rows(best.unsqueeze(-1), group)  # [b, tp]
    all_ids = _gather_rows(best_ids.unsqueeze(-1), group)
    winner = all_best.argmax(dim=-1, keepdim=True)  # first occurrence: the lowest rank
    return all_ids.gather(-1, winner).squeeze(-1)


def _log_sum_exp(scores: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Row-wise log-sum-exp over the whole vocabulary of ``scores`` ``[b, V_local]`` -> ``[b, 1]``."""
    shift = all_reduce_max_(scores.amax(dim=-1, keepdim=True), group)
    sum_exp = all_reduce_sum_((scores - shift).exp().sum(dim=-1, keepdim=True), group)
    return shift + sum_exp.log()


def _sorted_candidates(scores: torch.Tensor, ids: torch.Tensor, k: int,
                       group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top ``k`` ``(scores, ids)``, each ``[b, k']``, by score desc then id asc."""
    k_local = min(k, scores.shape[-1])
    vals, idx = scores.topk(k_local, dim=-1)
    cand_vals = _gather_rows(vals, group)
    cand_ids = _gather_rows(ids[idx], group)
    # Sort by id, then stably by score: ties keep id order, whatever the layout.
    by_id = cand_ids.argsort(dim=-1, stable=True)
    cand_vals, cand_ids = cand_vals.gather(-1, by_id), cand_ids.gather(-1, by_id)
    order = cand_vals.argsort(dim=-1, descending=True, stable=True)[:, : min(k, cand_vals.shape[-1])]
    return cand_vals.gather(-1, order), cand_ids.gather(-1, order)


def sample_vocab_parallel(logits: torch.Tensor, params: SamplingParams, *, step: int, vocab_start: int,
                          vocab_size: int, tp_group: ProcessGroup = None,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from vocab-parallel logits; identical on every rank of ``tp_group``.

    ``logits`` ``[b, V_local]`` hold ids ``[vocab_start, vocab_start + V_local)``; ids
    ``>= vocab_size`` (TP padding rows) are never chosen. ``rows`` ``[b]`` (default
    ``arange(b)``) key the noise per sequence. Returns ``[b]`` int64 global token ids.
    """
    b, v_local = logits.shape
    ids = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
    scores = logits.to(torch.float64).masked_fill(ids >= vocab_size, -math.inf)
    if params.greedy:
        return _argmax_over_shards(scores, ids, tp_group)
    if rows is None:
        rows = torch.arange(b, device=logits.device)
    scores = scores / params.temperature
    if params.top_k == 0 and params.top_p >= 1.0:
        return _argmax_over_shards(scores + gumbel_noise(params.seed, step, rows, ids), ids, tp_group)
    k = params.top_k if params.top_k > 0 else params.max_candidates
    full_lse = None if params.top_k > 0 or params.top_p >= 1.0 else _log_sum_exp(scores, tp_group)
    vals, cand_ids = _sorted_candidates(scores, ids, k, tp_group)
    if params.top_p < 1.0:
        lse = torch.logsumexp(vals, dim=-1, keepdim=True) if full_lse is None else full_lse
        probs = (vals - lse).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        vals = vals.masked_fill(mass_before >= params.top_p, -math.inf)
    choice = (vals + gumbel_noise(params.seed, step, rows, cand_ids)).argmax(dim=-1, keepdim=True)
    return cand_ids.gather(-1, choice).squeeze(-1)
