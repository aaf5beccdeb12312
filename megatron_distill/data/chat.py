"""Prompt/response and chat datasets for distillation, in the engine's micro-batch format.

Tokenization. With a chat template the row is a conversation; the prompt is every message but
the last (assistant) one, rendered with ``add_generation_prompt=True``, and the response is the
rest of the fully rendered conversation (the assistant content and whatever the template puts
after it: end-of-turn / EOS). The full text is tokenized once (``add_special_tokens=False``: the
template writes its own BOS); with a fast tokenizer a token is a response token when its
character span ends past the prompt (a token straddling the boundary counts as response), with a
slow one the prompt and the remainder are tokenized separately. A prompt/response row without a
chat template is ``[bos] + prompt ids + response ids + [eos]`` (BOS only when the tokenizer has
one). The loss mask covers the response tokens only.

A sample of ``n + 1`` ids is truncated to ``seq_length + 1`` (counted in ``stats.truncated``),
then ``tokens = ids[:-1]``, ``labels = ids[1:]``, ``loss_mask`` = response mask of the labels,
padded to ``seq_length`` (pad id in tokens, 0 in labels, 0 in the loss mask). A sample left
with no response token after truncation is dropped (``stats.dropped_no_loss``).

Order. Global batch ``i`` holds samples ``[i*G, (i+1)*G)`` of an endless stream; sample ``k`` is
row ``perm_e[k mod N]`` of epoch ``e = k // N``, ``perm_e`` a permutation seeded by
``(seed, e)``. Each DP rank takes its contiguous ``G / dp`` slice, cut into micro-batches. With
``pack=True`` the samples are first packed (seeded shuffle, then greedy first-fit, once) into
rows of ``seq_length`` slots (see ``packing.py``) and those rows are what epochs shuffle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_distill.data.batching import SamplePosition, check_batch_sizes, split_for_rank
from megatron_distill.data.packing import collate_packed, first_fit_pack, pack_row
from megatron_distill.data.rows import MalformedRowError, Row, iter_raw_rows, parse_row
from megatron_distill.data.tokenizer import pad_token_id

_EPOCH_SEED_STRIDE = 1_000_003


@dataclass
class ChatDataStats:
    """Counts of what happened to the input rows."""

    rows_read: int = 0
    skipped_malformed: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    samples: int = 0
    packed_rows: int = 0
    no_privileged_context: int = 0


def tokenize_row(row: Row, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the whole sample and a 0/1 mask marking response ids (same length)."""
    if getattr(tokenizer, "chat_template", None):
        messages = row.as_messages()
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise MalformedRowError(
                f"{row.source}: the chat template renders the prompt differently when the response follows "
                "(the prompt with add_generation_prompt=True is not a prefix of the full conversation)"
            )
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = [int(end > len(prompt_text)) for _, end in enc["offset_mapping"]]
        else:
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
            ids, mask = list(prompt_ids) + list(response_ids), [0] * len(prompt_ids) + [1] * len(response_ids)
    else:
        if row.messages is not None:
            raise MalformedRowError(f"{row.source}: a 'messages' row needs a tokenizer with a chat template")
        if tokenizer.eos_token_id is None:
            raise ValueError("plain prompt/response concatenation needs a tokenizer with an eos token")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt_ids = bos + list(tokenizer(row.prompt, add_special_tokens=False)["input_ids"])
        response_ids = list(tokenizer(row.response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids, mask = prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)
    if not any(mask):
        raise MalformedRowError(f"{row.source}: the response tokenizes to nothing")
    if mask[0]:
        raise MalformedRowError(f"{row.source}: the prompt tokenizes to nothing (nothing to predict the response from)")
    return ids, mask


class ChatBatches:
    """Tokenized prompt/response or chat rows from local files, served as this DP rank's micro-batches.

    ``get(iteration)`` returns a list of ``global_batch_size / (dp_size * micro_batch_size)``
    dicts: ``tokens`` [b, s] long, ``labels`` [b, s] long (next token; 0 at padding),
    ``loss_mask`` [b, s] float (1 on response labels), ``position_ids`` [b, s] long, with
    ``pack=True`` also ``attention_mask`` [b, 1, s, s] bool (True = masked; causal,
    block-diagonal over packed documents), and ``meta``: a list of b dicts (not tensors) with
    ``source`` ("FILE: row N (0-based)[, line L]"), ``privileged_context`` and ``reference`` (str or None),
    ``prompt_length`` (int: ``tokens[:prompt_length]`` is the prompt, before any response token); a packed
    row's meta is ``{"documents": [those dicts, in row order]}``.

    All rows are read, validated and tokenized at construction (errors surface before training).
    A malformed row raises ``MalformedRowError`` (a ``ValueError`` naming file, 0-based row and
    problem) unless ``skip_malformed``, which skips and counts it in ``stats.skipped_malformed``.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer: Any,
        seq_length: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        skip_malformed: bool = False,
        pack: bool = False,
        cache_dir: str | None = None,
        privileged_template: str | None = None,
    ) -> None:
        check_batch_sizes(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.seq_length, self.global_batch_size, self.micro_batch_size = seq_length, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.pack = dp_rank, dp_size, pack
        self.pad_token_id = pad_token_id(tokenizer)
        # Privileged-context self-distillation (data/privileged.py): the teacher's view per sample.
        self.privileged_template = privileged_template
        self._tokenizer = tokenizer
        if privileged_template is not None and pack:
            raise ValueError("privileged-context self-distillation does not combine with --pack-sequences")
        self.stats = ChatDataStats()
        self.position = SamplePosition(global_batch_size, seed)
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self._samples: list[dict[str, Any]] = []
        for path in self.paths:
            for where, raw in iter_raw_rows(path, cache_dir=cache_dir):
                self.stats.rows_read += 1
                try:
                    row = parse_row(where, raw)
                    self._add_sample(row, *tokenize_row(row, tokenizer))
                except MalformedRowError:
                    if not skip_malformed:
                        raise
                    self.stats.skipped_malformed += 1
        self.stats.samples = len(self._samples)
        if not self._samples:
            raise ValueError(f"no usable samples in {[str(p) for p in self.paths]} (stats: {asdict(self.stats)})")
        self._packs: list[list[int]] | None = self._build_packs(seed) if pack else None
        self._perm_cache: tuple[int, int, list[int]] | None = None

    def _build_packs(self, seed: int) -> list[list[int]]:
        """Sample indices of each packed row: a seeded shuffle of the samples, then first-fit."""
        order = torch.randperm(len(self._samples), generator=torch.Generator().manual_seed(seed)).tolist()
        bins = first_fit_pack([self._samples[i]["tokens"].numel() for i in order], self.seq_length)
        self.stats.packed_rows = len(bins)
        return [[order[j] for j in b] for b in bins]

    def _add_sample(self, row: Row, ids: list[int], mask: list[int]) -> None:
        if len(ids) > self.seq_length + 1:
            self.stats.truncated += 1
            ids, mask = ids[: self.seq_length + 1], mask[: self.seq_length + 1]
        if not any(mask[1:]):
            self.stats.dropped_no_loss += 1
            return
        ids_t = torch.tensor(ids, dtype=torch.long)
        # prompt_length: ids[:prompt_length] are the prompt (what on-policy rollouts generate from).
        meta = {"source": row.source, "privileged_context": row.privileged_context, "reference": row.reference,
                "prompt_length": mask.index(1)}
        loss_mask = torch.tensor(mask[1:], dtype=torch.float)
        sample = {"tokens": ids_t[:-1], "labels": ids_t[1:], "loss_mask": loss_mask, "meta": meta}
        if self.privileged_template is not None:
            from megatron_distill.data.privileged import context_ids

            if row.privileged_context:
                sample["context_ids"] = context_ids(self._tokenizer, self.privileged_template, row.privileged_context)
            else:
                sample["context_ids"] = []
                self.stats.no_privileged_context += 1
            meta["context_ids"] = sample["context_ids"]  # on-policy rollouts rebuild the teacher's view from it
        self._samples.append(sample)

    @property
    def num_rows(self) -> int:
        """Rows per epoch: samples, or packed rows with ``pack=True``."""
        return len(self._packs) if self._packs is not None else len(self._samples)

    def _permutation(self, epoch: int) -> list[int]:
        seed = self.position.seed
        if self._perm_cache is None or self._perm_cache[:2] != (seed, epoch):
            gen = torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)
            self._perm_cache = (seed, epoch, torch.randperm(self.num_rows, generator=gen).tolist())
        return self._perm_cache[2]

    def global_batch_rows(self, iteration: int) -> list[int]:
        """Row indices (into samples, or packs) of global batch ``iteration``, the same on every rank."""
        start, n = self.position.start(iteration), self.num_rows
        return [self._permutation(k // n)[k % n] for k in range(start, start + self.global_batch_size)]

    def _unpacked(self, index: int) -> dict[str, Any]:
        s = self._samples[index]
        row = pack_row([s], self.seq_length, self.pad_token_id)
        out = {
            "tokens": row["tokens"],
            "labels": row["labels"],
            "loss_mask": row["loss_mask"],
            "position_ids": torch.arange(self.seq_length),
            "meta": s["meta"],
        }
        if "context_ids" in s:
            from megatron_distill.data.privileged import teacher_fields

            fields = teacher_fields(row["tokens"], row["labels"], row["loss_mask"], s["context_ids"],
                                    self._tokenizer.bos_token_id, self.pad_token_id)
            out.update(fields)
            out["loss_mask"] = out["loss_mask"] * (fields["teacher_index"] >= 0).float()
        return out

    def _collate(self, rows: list[int]) -> dict[str, Any]:
        if self._packs is not None:
            packed = [
                pack_row([self._samples[i] for i in self._packs[r]], self.seq_length, self.pad_token_id) for r in rows
            ]
            batch: dict[str, Any] = collate_packed(packed)
            batch["meta"] = [{"documents": [self._samples[i]["meta"] for i in self._packs[r]]} for r in rows]
            return batch
        items = [self._unpacked(r) for r in rows]
        keys = ["tokens", "labels", "loss_mask", "position_ids"]
        if "teacher_tokens" in items[0]:
            keys += ["teacher_tokens", "teacher_position_ids", "teacher_index"]
        batch = {k: torch.stack([it[k] for it in items]) for k in keys}
        batch["meta"] = [it["meta"] for it in items]
        return batch

    def get(self, iteration: int) -> list[dict[str, Any]]:
        """This DP rank's micro-batches of global batch ``iteration`` (see the class docstring)."""
        chunks = split_for_rank(self.global_batch_rows(iteration), self.dp_rank, self.dp_size, self.micro_batch_size)
        self.position.advance(iteration)
        return [self._collate(chunk) for chunk in chunks]

    def state_dict(self) -> dict[str, Any]:
        """Data position: next ``iteration``, ``consumed_samples``, ``epoch``, ``seed``, and ``num_rows``."""
        state = self.position.state_dict()
        state["epoch"] = state["consumed_samples"] // self.num_rows
        state["num_rows"] = self.num_rows
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the checkpointed position; raises ``ValueError`` if the data changed size."""
        if self.pack and int(state["seed"]) != self.position.seed:
            self._packs = self._build_packs(int(state["seed"]))
        if int(state["num_rows"]) != self.num_rows:
            raise ValueError(
                f"cannot resume the data position: the checkpoint saw {state['num_rows']} rows per epoch, "
                f"the training data now has {self.num_rows} (different files, --seq-length or packing?)"
            )
        self.position.load_state_dict(state)
