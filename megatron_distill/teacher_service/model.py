"""The teacher behind the service: a Hugging Face causal LM answering top-k log-prob queries.

The service loads the teacher with transformers' ``AutoModelForCausalLM`` (single process, no
tensor or pipeline parallelism) rather than as a Megatron GPTModel: a replica then needs no
``torch.distributed`` / Megatron parallel state of its own, and the engine's own import of the
same checkpoint gives the same logits to 1e-5 (tests/distributed/test_hf_convert.py). Only the
architectures the engine converts are accepted (Llama 3.x, Qwen2/2.5, Qwen3; checked with
``models.hf_config.hf_architecture``), so the teacher's logits are ``lm_head(final hidden)``.

Each row of a request is one causal sequence starting at position 0 (no packing / attention
segments). Logits are never materialized for the whole batch: the final hidden states are
projected ``chunk_rows`` positions at a time, then tempered, log-softmaxed and cut to the top k.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from megatron_distill.models.hf_config import hf_architecture, read_hf_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherModel:
    """A loaded teacher. ``topk(tokens, k, temperature)`` -> top-k ids and log-probs.

    Args:
        hf_dir: local Hugging Face model directory (safetensors; nothing is downloaded).
        dtype: "float32", "bfloat16" or "float16" (weights and activations; the softmax is fp32).
        device: "cpu", "cuda" or None (cuda when available).
        threads: torch intra-op threads on the CPU (None: torch's default).
        chunk_rows: positions projected to logits at a time.
    """

    def __init__(self, hf_dir: str, dtype: str = "float32", device: str | None = None,
                 threads: int | None = None, chunk_rows: int = 1024) -> None:
        from transformers import AutoModelForCausalLM

        config, where = read_hf_config(hf_dir)
        self.architecture = hf_architecture(config, where)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(
            os.fspath(hf_dir), dtype=DTYPES[dtype], local_files_only=True
        ).to(self.device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.chunk_rows = chunk_rows
        self._lock = threading.Lock()  # one forward at a time (the actor's other threads: pings, sentinel)

    def info(self) -> dict:
        """``{"vocab_size", "model", "pid"}`` (JSON-serializable; pid: this process)."""
        return {"vocab_size": self.vocab_size, "model": self.architecture, "pid": os.getpid()}

    def block(self, seconds: float) -> None:
        """Sleep ``seconds`` (the pool's sentinel call: it fails the moment this process dies)."""
        time.sleep(seconds)

    @torch.no_grad()
    def topk(self, tokens: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of ``log_softmax(logits / temperature)`` at every position.

        ``tokens`` ``[b, s]`` int64 ids in ``[0, vocab_size)``. Returns ``(ids [b, s, k] int64,
        logprobs [b, s, k] float32)`` on the CPU, largest log-prob first; position ``i`` scores
        the token that follows ``tokens[:, :i + 1]``.
        """
        if k > self.vocab_size:
            raise ValueError(f"topk {k} exceeds the teacher's vocabulary ({self.vocab_size})")
        with self._lock:
            return self._topk(tokens, k, temperature)

    def _topk(self, tokens: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(self.device, torch.int64)
        hidden = self.model.base_model(input_ids=tokens).last_hidden_state  # [b, s, h]
        head = self.model.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1])
        ids = torch.empty((flat.shape[0], k), dtype=torch.int64)
        logp = torch.empty((flat.shape[0], k), dtype=torch.float32)
        for r0 in range(0, flat.shape[0], self.chunk_rows):
            r1 = min(r0 + self.chunk_rows, flat.shape[0])
            z = head(flat[r0:r1]).float().div_(temperature)
            values, idx = torch.log_softmax(z, dim=-1).topk(k, dim=-1)
            ids[r0:r1], logp[r0:r1] = idx.cpu(), values.cpu()
        shape = (*tokens.shape, k)
        return ids.view(shape), logp.view(shape)
