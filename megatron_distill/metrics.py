"""Progress lines on the console and one JSON object per logged iteration (``--metrics-file``)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict

import torch

from megatron_distill.training import IterationStats


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory of this process in GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _rollout_part(extra: dict) -> str:
    """The progress line's rollout summary: time split, generation speed, lengths, on/off-policy kd, reward."""
    text = (f"rollout {extra['rollout_seconds']:.2f}s / train {extra['train_seconds']:.2f}s, "
            f"{extra['rollout_samples']} gen @ {extra['rollout_tokens_per_sec']:,.0f} tok/s")
    if "rollout_mean_response_length" in extra:
        text += (f", len {extra['rollout_mean_response_length']:.1f}, "
                 f"trunc {extra['rollout_truncated_fraction']:.2f}")
    # A part is absent when the batch has none of its tokens (lambda 1: no off-policy part).
    parts = [f"{extra[k]:.4f}" if k in extra else "-" for k in ("kd_loss_on_policy", "kd_loss_off_policy")]
    if parts != ["-", "-"]:
        text += f", kd on/off {parts[0]}/{parts[1]}"
    if "reward_mean" in extra:
        text += f", reward {extra['reward_mean']:.3f}"
    if extra.get("weight_sync_seconds"):  # sglang backend, on iterations that exported the student
        text += f", sync {extra['weight_sync_seconds']:.2f}s"
    return text


class MetricsLogger:
    """Rank 0 prints progress and appends JSON lines; other ranks stay silent."""

    def __init__(self, path: str | None, rank: int, total_iters: int, phase: str = "distill",
                 stream=None):
        self.path = path
        self.rank = rank
        self.total_iters = total_iters
        self.phase = phase
        self.stream = stream or sys.stdout
        self._elapsed = 0.0
        self._count = 0
        if path and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, stats: IterationStats, device: torch.device, extra: dict | None = None) -> dict:
        """Record one iteration: print a progress line and append the JSON record (rank 0)."""
        self._elapsed += stats.seconds
        self._count += 1
        record = asdict(stats)
        record.pop("extra", None)
        record["phase"] = self.phase
        record["peak_memory_gib"] = peak_memory_gib(device)
        record.update(stats.extra)
        if extra:
            record.update(extra)
        if self.rank != 0:
            return record
        remaining = (self.total_iters - stats.iteration) * (self._elapsed / self._count)
        parts = [
            f"[{self.phase}] iter {stats.iteration:>5}/{self.total_iters}",
            f"loss {stats.loss:.4f}",
        ]
        if self.phase == "distill":
            parts.append(f"kd {stats.kd_loss:.4f}")
        if stats.ce_loss:
            parts.append(f"ce {stats.ce_loss:.4f}")
        grad = "n/a" if stats.grad_norm is None or math.isnan(stats.grad_norm) else f"{stats.grad_norm:.3f}"
        parts += [f"lr {stats.lr:.2e}", f"grad-norm {grad}", f"{stats.tokens_per_sec:,.0f} tok/s",
                  f"tokens {stats.num_tokens}"]
        if "rollout_seconds" in stats.extra:  # on-policy (onpolicy.py)
            parts.append(_rollout_part(stats.extra))
        if record["peak_memory_gib"] is not None:
            parts.append(f"peak {record['peak_memory_gib']:.2f} GiB")
        parts.append(f"eta {remaining:.0f}s")
        print(" | ".join(parts), file=self.stream, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record
