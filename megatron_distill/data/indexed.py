"""Megatron-Core indexed (``.bin`` / ``.idx``) datasets for offline distillation at pretraining scale.

``--data-path`` follows Megatron-LM: ``[prefix]``, ``[prefix1, prefix2, ...]`` (blended in
proportion to their sizes) or ``[w1, prefix1, w2, prefix2, ...]`` (blended with weights
``w_i``, normalized). The datasets are built with Megatron-Core's own machinery:
``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` + ``GPTDatasetConfig``, whose index building
uses the compiled ``megatron.core.datasets.helpers_cpp`` (shipped prebuilt with megatron-core
0.16.1 and importable on the CPU; checked). The sample order is therefore exactly Megatron-LM's
for the same blend, seed, sequence length and sample count: documents shuffled per epoch and
concatenated into ``seq_length + 1``-token samples, samples shuffled, and a blend drawn by
Megatron's deterministic error-minimizing weighted interleave (``BlendedDataset``).

Document boundaries. Default (``reset_at_document_boundaries=False``), as Megatron-LM's
default pretraining: documents are concatenated across sample boundaries, attention is plainly
causal across documents (no ``attention_mask`` key: the model uses its causal kernel),
``position_ids`` are ``0..s-1`` and ``loss_mask`` is all ones. With
``reset_at_document_boundaries=True`` (Megatron's ``--reset-position-ids
--reset-attention-mask --eod-mask-loss`` together): positions restart after each EOD, the batch
carries an ``attention_mask`` ``[b, 1, s, s]`` (True = masked) that is causal and
block-diagonal over documents, and the loss mask is 0 where the input token is EOD, so a
document's EOD never predicts the next document's first token. Documents need an EOD at their
end for this (``preprocess --append-eod``).

Index caches (``.npy`` files) are written to ``cache_dir`` (default: Megatron's, next to the
data under ``cache/``). With ``torch.distributed`` initialized, building is collective: rank 0
builds the caches first, then the others read them; construct on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from megatron_distill.data.batching import SamplePosition, check_batch_sizes, split_for_rank
from megatron_distill.data.packing import document_attention_mask, document_ids_from_eod


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM ``--data-path`` list -> (prefixes, normalized weights or None).

    Raises ``ValueError`` naming ``--data-path`` for an empty list, a non-positive weight, or a
    prefix whose ``.bin`` / ``.idx`` file is missing.
    """
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty: give PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    weights: list[float] | None = None
    prefixes = items
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
            prefixes = items[1::2]
        except ValueError:
            weights, prefixes = None, items  # an even number of bare prefixes
    if weights is not None:
        if any(w <= 0 for w in weights):
            raise ValueError(f"--data-path weights must be > 0, got {weights}")
        weights = [w / sum(weights) for w in weights]
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
        if missing:
            raise ValueError(
                f"--data-path prefix {prefix!r}: {' and '.join(prefix + ext for ext in missing)} not found "
                "(a prefix names PREFIX.bin and PREFIX.idx, written by `python -m megatron_distill.data.preprocess`)"
            )
    return prefixes, weights


class _EodTokenizer:
    """What Megatron's GPTDataset reads from a tokenizer: ``eod``, ``vocab_size``, ``unique_identifiers``.

    It has no ``pad``: Megatron then never treats a token of pretraining text as padding.
    """

    def __init__(self, eod: int) -> None:
        self.eod = eod
        self.unique_identifiers = {"class": "EodTokenizer", "eod": eod}  # part of the index-cache key
        self.vocab_size = None  # let IndexedDataset read the token dtype from the .idx file


class IndexedBatches:
    """Micro-batches of a Megatron ``--data-path`` blend for this DP rank, in the engine's format.

    ``get(iteration)`` returns ``global_batch_size / (dp_size * micro_batch_size)`` dicts of
    ``tokens`` [b, s] long, ``labels`` [b, s] long (next tokens), ``loss_mask`` [b, s] float,
    ``position_ids`` [b, s] long, with ``reset_at_document_boundaries`` also ``attention_mask``
    [b, 1, s, s] bool, and ``meta``: b dicts ``{"dataset_id", "sample_index"}`` (which blend
    component, which sample of the stream). Global batch ``i`` is samples ``[i*G, (i+1)*G)`` of
    the Megatron dataset built for ``num_samples`` samples (past that, the stream wraps around).
    """

    def __init__(
        self,
        data_path: Sequence[str],
        seq_length: int,
        global_batch_size: int,
        micro_batch_size: int,
        num_samples: int,
        eod_token_id: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        reset_at_document_boundaries: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        check_batch_sizes(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.seq_length, self.global_batch_size, self.micro_batch_size = seq_length, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.eod_token_id, self.reset = eod_token_id, reset_at_document_boundaries
        self.prefixes, self.weights = parse_data_path(data_path)
        self._build_args = (num_samples, None if cache_dir is None else str(cache_dir))
        self.position = SamplePosition(global_batch_size, seed)
        self.dataset = self._build(seed)

    def _build(self, seed: int) -> Any:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        num_samples, cache_dir = self._build_args
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=self.seq_length,
            blend=(self.prefixes, self.weights),
            split="1,0,0",
            path_to_cache=cache_dir,
            tokenizer=_EodTokenizer(self.eod_token_id),
            reset_position_ids=self.reset,
            reset_attention_mask=self.reset,
            eod_mask_loss=self.reset,
            create_attention_mask=False,  # built here from document ids, vectorized
        )
        builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config)
        if torch.distributed.is_initialized():
            train, _, _ = builder.build()
        else:
            # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on an index-cache
            # miss even without a process group; a single process is rank 0.
            with mock.patch.object(torch.distributed, "get_rank", lambda *args, **kwargs: 0):
                train, _, _ = builder.build()
        if train is None or len(train) == 0:
            raise ValueError(f"--data-path {self.prefixes}: no training samples of --seq-length {self.seq_length}")
        return train

    def _sample(self, index: int) -> dict[str, Any]:
        item = self.dataset[index % len(self.dataset)]
        return {
            "tokens": item["tokens"],
            "labels": item["labels"],
            "loss_mask": item["loss_mask"].float(),
            "position_ids": item["position_ids"],
            "meta": {"dataset_id": int(item.get("dataset_id", 0)), "sample_index": index},
        }

    def get(self, iteration: int) -> list[dict[str, Any]]:
        """This DP rank's micro-batches of global batch ``iteration``."""
        start = self.position.start(iteration)
        chunks = split_for_rank(range(start, start + self.global_batch_size), self.dp_rank, self.dp_size,
                                self.micro_batch_size)
        self.position.advance(iteration)
        batches = []
        for chunk in chunks:
            items = [self._sample(i) for i in chunk]
            batch: dict[str, Any] = {
                k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")
            }
            if self.reset:
                batch["attention_mask"] = document_attention_mask(
                    document_ids_from_eod(batch["tokens"], self.eod_token_id)
                )
            batch["meta"] = [it["meta"] for it in items]
            batches.append(batch)
        return batches

    def state_dict(self) -> dict[str, Any]:
        """Data position: next ``iteration``, ``consumed_samples``, ``epoch``, ``seed``, ``num_samples``."""
        state = self.position.state_dict()
        state["epoch"] = state["consumed_samples"] // len(self.dataset)
        state["num_samples"] = self._build_args[0]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the checkpointed position (rebuilding the index if the seed or size changed)."""
        rebuild = int(state["seed"]) != self.position.seed or int(state["num_samples"]) != self._build_args[0]
        self.position.load_state_dict(state)
        if rebuild:
            self._build_args = (int(state["num_samples"]), self._build_args[1])
            self.dataset = self._build(self.position.seed)
