#!/usr/bin/env python
"""Entry point: ``torchrun --nproc-per-node N launch/pretrain_distill.py <Megatron-LM-style flags>``.

Parses the flags (and ``--config-file`` recipe) into a ``DistillConfig``, validates it for the
world size before any process group exists, then runs the job. Exit codes: 0 done, 2 bad
configuration.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_distill.arguments import parse_config  # noqa: E402
from megatron_distill.config import ConfigError  # noqa: E402
from megatron_distill.resilience import EXIT_COLLECTIVE_TIMEOUT  # noqa: E402


def _is_collective_timeout(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(key in text for key in ("timed out", "timeout", "watchdog"))


def _where() -> str:
    """``rank R (pipeline stage S, tensor-parallel rank T)`` as far as it is known."""
    rank = os.environ.get("RANK", "0")
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return (f"rank {rank} (pipeline stage {ps.get_pipeline_model_parallel_rank()}, "
                    f"tensor-parallel rank {ps.get_tensor_model_parallel_rank()})")
    except Exception:  # noqa: BLE001 - best effort for an error message
        pass
    return f"rank {rank}"


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, run; returns the process exit code.

    Exit codes: 0 done; 2 bad configuration or input; 75 preempted (a checkpoint was saved:
    requeue with --auto-resume); 76 too many consecutive non-finite steps (checkpoint of the last
    good state saved); 77 a collective timed out (names this rank's stage).
    """
    try:
        cfg = parse_config(argv)
        from megatron_distill.runner import run, shutdown

        run(cfg)
    except ConfigError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            # Every rank finds the same error; let rank 0 report it before torchrun, seeing a
            # rank exit, terminates the others.
            time.sleep(5)
        return 2
    except SystemExit:  # argparse errors (before start-up), preemption and skip-limit stops (after)
        runner = sys.modules.get("megatron_distill.runner")
        if runner is not None:
            runner.shutdown()
        raise
    except Exception as err:  # a collective that timed out must end the job, not hang it
        if not _is_collective_timeout(err):
            raise
        print(f"error: {_where()}: {err.__class__.__name__}: a collective operation did not finish within "
              "--distributed-timeout-minutes; another rank probably died or hangs. Stopping this rank.",
              file=sys.stderr, flush=True)
        os._exit(EXIT_COLLECTIVE_TIMEOUT)  # skip tear-down: it would wait on the same dead peers
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
