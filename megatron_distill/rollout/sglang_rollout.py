"""The engine side of ``--rollout-backend sglang``: weight sync and one request per data-parallel group.

An sglang server (launched by the user, serving the student's architecture) generates the
student's rollouts instead of the in-place generator (``generate.py``); the teacher's
``--seq-kd`` rollouts stay in place (the server serves the student only).

* **Weight sync** (``maybe_sync``, every ``--sglang-sync-interval`` iterations, on every rank):
  all ranks export the student together (``export_hf``: collective over TP / PP; written to a
  temp dir and renamed, so the server never sees a half-written checkpoint) into
  ``--sglang-weights-dir/step_NNNNNNN``; then global rank 0 alone posts
  ``/update_weights_from_disk`` (one server, one update) and prunes all but the two newest
  exports; its outcome is broadcast, which doubles as the barrier: no rank asks for rollouts
  before the server holds the new weights, and an error is raised on every rank.
* **Generation** (``generate``): each data-parallel group has its own prompts, so the group's
  first model-parallel rank (TP 0, PP 0) posts them to ``/generate``; the answers are broadcast
  over the model-parallel group and turned into the same ``GenerationOutput`` on every TP / PP
  rank, as ``generate()`` guarantees. A failed request is broadcast as an error, so the other
  ranks raise too instead of waiting in a collective.

The directory must be on a filesystem the server can read at the same path.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_distill.config import SGLANG_BACKOFF_S, SGLANG_RETRIES, RolloutConfig
from megatron_distill.rollout.generate import GenerationOutput
from megatron_distill.rollout.sampling import SamplingParams
from megatron_distill.rollout.sglang_backend import Completion, SglangClient, SglangError, completions_to_output

_EXPORT_NAME = re.compile(r"^step_\d{7}$")
KEEP_EXPORTS = 2  # the one the server runs and the one before (still readable if an update fails midway)


def export_dir(weights_dir: str, iteration: int) -> str:
    """Where the student of ``iteration`` is exported: ``weights_dir/step_NNNNNNN``."""
    return os.path.join(os.path.abspath(weights_dir), f"step_{iteration:07d}")


def prune_exports(weights_dir: str, keep: int = KEEP_EXPORTS) -> list[str]:
    """Delete all but the ``keep`` newest ``step_*`` exports in ``weights_dir``; returns the deleted paths."""
    names = sorted(n for n in os.listdir(weights_dir) if _EXPORT_NAME.match(n))
    doomed = [os.path.join(weights_dir, n) for n in names[: max(0, len(names) - keep)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


class SglangRollouts:
    """Student rollouts from an sglang server, for one rank of the engine (module docstring).

    ``engine``: the training engine (``engine.stage.student`` is exported, ``engine.pg`` gives the
    groups, ``engine.cfg`` the student shape and tokenizer dir). ``client``: default an
    ``SglangClient`` for ``cfg.sglang_url`` (only ranks that talk build one). ``stop_token_ids``:
    written as the export's ``eos_token_id`` when the student has no HF config of its own (it was
    not ``--load``-ed from an HF dir), so a server launched from an export stops where the engine does.
    """

    def __init__(self, cfg: RolloutConfig, engine: Any, device: torch.device, client: SglangClient | None = None,
                 stop_token_ids: tuple[int, ...] = ()):
        self.cfg, self.engine, self.device = cfg, engine, device
        pg = engine.pg
        self.source_config = engine.cfg.checkpoint.student_hf
        if self.source_config is None and stop_token_ids:
            from megatron_distill.models.hf_config import hf_config_from_shape

            self.source_config = {**hf_config_from_shape(engine.cfg.student), "eos_token_id": list(stop_token_ids)}
        self.weights_dir = os.path.abspath(cfg.sglang_weights_dir)
        self.interval = cfg.sglang_sync_interval
        self.requester = pg.tp.rank() == 0 and pg.pp.rank() == 0  # first model-parallel rank of its DP group
        self.updater = dist.get_rank() == 0
        talks = self.requester or self.updater
        self.client = client if client is not None or not talks else SglangClient(
            cfg.sglang_url, timeout_s=cfg.sglang_timeout_s, retries=SGLANG_RETRIES, backoff_s=SGLANG_BACKOFF_S)
        # The requester's global rank, the source of the model-parallel broadcast.
        ranks = [None] * pg.mp.size()
        dist.all_gather_object(ranks, (self.requester, dist.get_rank()), group=pg.mp)
        self.src = next(rank for is_req, rank in ranks if is_req)
        self.synced_at: int | None = None
        self.last_path: str | None = None
        # broadcast_object_list stages through this device (the current CUDA device under NCCL).
        self._obj_device = device if device.type == "cuda" else None

    def due(self, iteration: int) -> bool:
        """Whether ``iteration``'s rollouts need a fresh export (first call, then every ``interval``)."""
        return self.synced_at is None or iteration - self.synced_at >= self.interval

    def maybe_sync(self, iteration: int) -> float:
        """Export the student and make the server load it, when due (call on every rank); seconds spent."""
        if not self.due(iteration):
            return 0.0
        from megatron_distill.models.hf_convert import export_hf

        start = time.perf_counter()
        path = export_dir(self.weights_dir, iteration)
        tok = self.engine.cfg.data.tokenizer_model
        export_hf(self.engine.stage.student, self.engine.cfg.student, path, pg=self.engine.pg,
                  tokenizer_dir=tok if tok and os.path.isdir(tok) else None, source_config=self.source_config,
                  overwrite=True)
        status = None
        if self.updater:
            try:
                self.client.update_weights_from_disk(path)
                prune_exports(self.weights_dir)
            except (SglangError, OSError) as err:
                status = str(err)
        box = [status]
        dist.broadcast_object_list(box, src=0, device=self._obj_device)
        if box[0] is not None:
            raise SglangError(f"weight sync at iteration {iteration} failed: {box[0]}")
        self.synced_at, self.last_path = iteration, path
        return time.perf_counter() - start

    def generate(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams, *,
                 vocab_size: int, pad_token_id: int) -> GenerationOutput:
        """Responses to this DP group's prompts ``[b, P]`` (right-padded, ``prompt_lengths`` ``[b]``).

        Call on every rank of the model-parallel group with the same prompts; returns the same
        ``GenerationOutput`` on each (``generate()``'s layout, ``params.max_new_tokens`` enforced).
        """
        start = time.perf_counter()
        payload: tuple[str, Any] | None = None
        if self.requester:
            lengths = prompt_lengths.tolist()
            rows = [prompts[i, : lengths[i]].tolist() for i in range(prompts.shape[0])]
            try:
                answers = self.client.generate(rows, params)
                payload = ("ok", [(c.output_ids, c.finish_type, c.matched) for c in answers])
            except SglangError as err:
                payload = ("error", str(err))
        box = [payload]
        mp = self.engine.pg.mp
        if mp.size() > 1:
            dist.broadcast_object_list(box, src=self.src, group=mp, device=self._obj_device)
        kind, body = box[0]
        if kind == "error":
            raise SglangError(body)
        completions = [Completion(list(ids), finish, matched) for ids, finish, matched in body]
        return completions_to_output(prompts, prompt_lengths, completions, params, vocab_size=vocab_size,
                                     pad_token_id=pad_token_id, seconds=time.perf_counter() - start,
                                     url=self.cfg.sglang_url or "sglang")


__all__ = ["KEEP_EXPORTS", "SglangRollouts", "export_dir", "prune_exports"]
