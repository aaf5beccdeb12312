"""Keep going or stop cleanly: preemption signals, non-finite steps, collective time-outs.

* ``PreemptionHandler``: SIGTERM / SIGUSR1 (what Slurm sends before it kills or requeues a job)
  only set a flag; after the current iteration every rank agrees (an all-reduce of the flag), the
  job saves a checkpoint and exits with ``EXIT_PREEMPTED``. A second signal during the save is
  logged and ignored: the save runs to completion (and is atomic anyway).
* ``step_is_finite``: a non-finite loss or gradient on ANY rank makes every rank skip the
  optimizer step (no parameter, optimizer-state or LR-schedule change).
* ``FaultInjector``: test hooks (``MEGATRON_DISTILL_INJECT_FAULT``) that plant a NaN, a signal
  or a hang at a given iteration and rank, so the fault paths are tested for real.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — requeue and resume
EXIT_TOO_MANY_SKIPS = 76
EXIT_COLLECTIVE_TIMEOUT = 77
FAULT_ENV = "MEGATRON_DISTILL_INJECT_FAULT"


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag checked between iterations."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1), log=None):
        self.signals = signals
        self.received: int | None = None
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._previous = {}

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only); returns self."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            self._log(f"rank {_rank()}: received {signal.Signals(signum).name}: finishing this iteration, "
                      "then saving a checkpoint and exiting")
        else:
            self._log(f"rank {_rank()}: received {signal.Signals(signum).name} again: already stopping, "
                      "the checkpoint save is not interrupted")

    def should_stop(self, device: torch.device) -> bool:
        """Whether any rank received a signal (collective: call on every rank)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


FINITE_CHECK_ELEMENTS = 1 << 25  # isfinite's temporaries per slice: ~6 bytes per fp32 element


def local_grads_finite(ddp_model) -> bool:
    """Whether every gradient in this rank's Megatron DDP grad buffers is finite.

    Checked in slices: ``torch.isfinite`` of a whole buffer allocates an ``abs()`` copy and two
    bool tensors of its size (6 bytes per fp32 gradient: 6.9 GiB for a 1.2 B-parameter student),
    which was the peak of the whole training step.
    """
    flags = []
    for buffer in list(getattr(ddp_model, "buffers", [])) + list(getattr(ddp_model, "expert_parallel_buffers", [])):
        data = buffer.grad_data.view(-1)
        for start in range(0, data.numel(), FINITE_CHECK_ELEMENTS):
            flags.append(torch.isfinite(data[start:start + FINITE_CHECK_ELEMENTS]).all())
    return bool(torch.stack(flags).all()) if flags else True


def step_is_finite(loss_sums: torch.Tensor, ddp_model, device: torch.device) -> bool:
    """Collective: True when the global loss sums and every rank's gradients are finite."""
    ok = torch.tensor([1.0 if bool(torch.isfinite(loss_sums).all()) and local_grads_finite(ddp_model) else 0.0],
                      device=device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


@dataclass
class Fault:
    """One planted fault: ``kind`` (nan, nan-teacher, sigterm, sigusr1, hang) at ``iteration`` on ``rank``."""

    kind: str
    iteration: int
    rank: int
    micro_batch: int = 0


class FaultInjector:
    """Reads ``MEGATRON_DISTILL_INJECT_FAULT="kind:iteration:rank[:micro_batch],..."`` (tests only)."""

    KINDS = ("nan", "nan-teacher", "sigterm", "sigusr1", "hang")

    def __init__(self, spec: str | None = None):
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.faults: list[Fault] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split(":")
            if len(parts) not in (3, 4) or parts[0] not in self.KINDS:
                raise ValueError(f"{FAULT_ENV}: bad entry {item!r}; expected kind:iteration:rank[:micro_batch] "
                                 f"with kind in {self.KINDS}")
            self.faults.append(Fault(parts[0], int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else 0))

    def _mine(self, kind: str, iteration: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.iteration == iteration and f.rank == _rank()]

    def corrupt_batches(self, iteration: int, microbatches: list[dict]) -> list[dict]:
        """Plant NaN in a micro-batch's loss mask (student fault) or mark it for the teacher."""
        for fault in self._mine("nan", iteration):
            batch = dict(microbatches[fault.micro_batch])
            mask = batch["loss_mask"].clone()
            mask.view(-1)[0] = float("nan")
            batch["loss_mask"] = mask
            microbatches = microbatches[: fault.micro_batch] + [batch] + microbatches[fault.micro_batch + 1:]
        for fault in self._mine("nan-teacher", iteration):
            batch = dict(microbatches[fault.micro_batch])
            batch["inject_teacher_nan"] = torch.ones(1)
            microbatches = microbatches[: fault.micro_batch] + [batch] + microbatches[fault.micro_batch + 1:]
        return microbatches

    def before_iteration(self, iteration: int) -> None:
        """Deliver planted signals / hangs at the start of ``iteration`` (mid-run, on one rank)."""
        if self._mine("sigterm", iteration):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._mine("sigusr1", iteration):
            os.kill(os.getpid(), signal.SIGUSR1)
        if self._mine("hang", iteration):
            time.sleep(10**6)
