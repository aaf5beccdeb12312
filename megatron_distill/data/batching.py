"""Pieces shared by the data sources: the resumable sample position and the DP / micro-batch split.

Every data source maps an iteration to a contiguous range of global sample indices,
``[start, start + global_batch_size)``; each data-parallel rank takes its slice of that range
and cuts it into micro-batches. The mapping is a pure function of the iteration and of the
position restored from a checkpoint, so resuming reproduces the next batches exactly, and a
changed global batch size after resume continues from the consumed-sample count (as
Megatron-LM's ``consumed_train_samples`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    """Raise ``ValueError`` unless the global batch splits evenly into DP x micro-batches."""
    if micro_batch_size < 1 or global_batch_size < 1 or dp_size < 1:
        raise ValueError("--global-batch-size, --micro-batch-size and the data-parallel size must be >= 1")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"--global-batch-size ({global_batch_size}) must be a multiple of --micro-batch-size "
            f"({micro_batch_size}) x data-parallel size ({dp_size})"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} outside [0, {dp_size})")


def split_for_rank(items: Sequence[T], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[T]]:
    """This DP rank's contiguous share of a global batch, cut into micro-batches (in order)."""
    per_dp = len(items) // dp_size
    mine = items[dp_rank * per_dp : (dp_rank + 1) * per_dp]
    return [list(mine[i : i + micro_batch_size]) for i in range(0, per_dp, micro_batch_size)]


class SamplePosition:
    """Where the global sample stream stands: ``start(iteration)`` is the first sample index of it.

    ``start(i) = consumed_at_origin + (i - iteration_at_origin) * global_batch_size``; the origin is
    ``(0, 0)`` for a fresh run and the checkpointed ``(iteration, consumed_samples)`` after
    ``load_state_dict``. ``advance(i)`` records that iteration ``i`` was served.
    """

    def __init__(self, global_batch_size: int, seed: int) -> None:
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._origin = (0, 0)
        self.iteration = 0  # next iteration to serve

    def start(self, iteration: int) -> int:
        it0, consumed0 = self._origin
        if iteration < it0:
            raise ValueError(f"iteration {iteration} precedes the resumed data position (iteration {it0})")
        return consumed0 + (iteration - it0) * self.global_batch_size

    def advance(self, iteration: int) -> None:
        self.iteration = iteration + 1

    @property
    def consumed_samples(self) -> int:
        return self.start(self.iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.iteration = int(state["iteration"])
        self._origin = (self.iteration, int(state["consumed_samples"]))
