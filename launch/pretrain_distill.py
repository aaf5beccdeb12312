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


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, run; returns the process exit code."""
    try:
        cfg = parse_config(argv)
        from megatron_distill.runner import run, shutdown

        try:
            run(cfg)
        finally:
            shutdown()
    except ConfigError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            # Every rank finds the same error; let rank 0 report it before torchrun, seeing a
            # rank exit, terminates the others.
            time.sleep(5)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
