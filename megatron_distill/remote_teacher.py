"""The engine's side of a remote top-k teacher (``--teacher-remote ADDRESS --kd-topk K``).

The last pipeline stage's tensor-parallel rank 0 of each data-parallel group talks to the
service; the answers are broadcast to the other TP ranks of that stage, which hold other vocab
shards of the same tokens. Requests for iteration i + 1 go out before iteration i trains
(``prefetch``), so teacher latency overlaps training. Request ids name the iteration, DP rank and
micro-batch; the client refuses an answer whose id or token hash does not match.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_distill.teacher_service.client import RemoteTeacher


class RemoteTeacherFeed:
    """Attaches ``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[b, s, K]`` to this rank's micro-batches."""

    def __init__(self, address: str, topk: int, vocab_size: int, temperature: float, pg, device: torch.device,
                 token: str | None = None, timeout_s: float = 120.0, retries: int = 3):
        self.pg = pg
        self.device = device
        self.topk = topk
        self.temperature = temperature
        self.last_stage = pg.pp.rank() == pg.pp.size() - 1
        self.talks = self.last_stage and pg.tp.rank() == 0
        self.client = (
            RemoteTeacher(address, token, timeout_s=timeout_s, retries=retries, topk=topk, vocab_size=vocab_size)
            if self.talks else None
        )
        self._tp_src = dist.get_global_rank(pg.tp, 0) if pg.tp.size() > 1 else None

    def _rid(self, iteration: int, micro: int) -> str:
        return f"it{iteration}-dp{self.pg.dp.rank()}-mb{micro}"

    def prefetch(self, iteration: int, microbatches: list[dict]) -> None:
        """Send the requests of ``iteration``'s micro-batches (returns at once)."""
        if self.client is None:
            return
        for j, batch in enumerate(microbatches):
            self.client.prefetch(self._rid(iteration, j), batch["tokens"], temperature=self.temperature)

    def attach(self, iteration: int, microbatches: list[dict]) -> list[dict]:
        """The micro-batches with the teacher's answers added (last stage only; others unchanged)."""
        if not self.last_stage:
            return microbatches
        out = []
        for j, batch in enumerate(microbatches):
            b, s = batch["tokens"].shape
            if self.client is not None:
                ids, logprobs = self.client.get(self._rid(iteration, j), batch["tokens"])
                ids, logprobs = ids.to(self.device), logprobs.to(self.device, torch.float32)
            else:
                ids = torch.empty(b, s, self.topk, dtype=torch.int64, device=self.device)
                logprobs = torch.empty(b, s, self.topk, dtype=torch.float32, device=self.device)
            if self._tp_src is not None:
                dist.broadcast(ids, self._tp_src, group=self.pg.tp)
                dist.broadcast(logprobs, self._tp_src, group=self.pg.tp)
            out.append({**batch, "teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs})
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
