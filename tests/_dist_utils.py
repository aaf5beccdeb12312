"""Run a function in N local processes joined by a gloo process group, and collect the results.

Usage::

    from tests._dist_utils import run_distributed

    def worker(x):                      # module-level, so the spawned processes can import it
        rank = torch.distributed.get_rank()
        ...
        return something_picklable

    results = run_distributed(worker, 4, x, timeout=120)   # results[r] is rank r's return value

Each rank is a fresh process started with the ``spawn`` method of ``torch.multiprocessing``
(no state leaks from the pytest process). Before ``fn`` runs, the child has ``MASTER_ADDR``
(127.0.0.1), ``MASTER_PORT`` (a free port), ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set,
uses one intra-op thread, and (unless ``init_process_group=False``) has called
``torch.distributed.init_process_group`` for the whole world; the group is destroyed after
``fn`` returns. Return values travel back pickled (tensors by value).

If any rank raises, the other ranks are terminated at once (they would otherwise hang in a
collective) and a ``RuntimeError`` naming the rank and carrying its traceback is raised in the
caller. A rank that dies without reporting (e.g. a segfault) or a run that exceeds ``timeout``
also raises, naming the ranks concerned.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    init_process_group: bool,
    pg_timeout_s: float,
    results: Any,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=pg_timeout_s),
            )
        value = fn(*args, **kwargs)
        # Plain pickle: tensors are sent by value, not through shared memory that would vanish
        # with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if init_process_group and dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    init_process_group: bool = True,
    kwargs: dict | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the per-rank results.

    Args:
        fn: a module-level (picklable) callable. It runs after the process group is up; it finds
            its rank with ``torch.distributed.get_rank()``.
        world_size: number of processes.
        *args: positional arguments for ``fn``, identical on every rank (picklable).
        timeout: seconds for the whole run, start-up included, before every rank is killed
            and ``TimeoutError`` is raised. Also the process group's collective timeout.
        backend: ``torch.distributed`` backend (gloo on the CPU).
        init_process_group: set False when ``fn`` starts the process group itself (e.g. through
            ``megatron_distill.platform.init_distributed``, which reads the environment set here).
        kwargs: keyword arguments for ``fn``.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        RuntimeError: a rank raised (message names the rank, with its traceback) or died
            without reporting.
        TimeoutError: not every rank reported within ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, backend, init_process_group, timeout, results_q, fn, args,
                  kwargs or {}),
            name=f"run_distributed-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    where = f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size})"
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results_q.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode is not None]
                if dead:
                    # Give a message already in flight a last chance before declaring the rank lost.
                    try:
                        rank, ok, payload = results_q.get(timeout=1.0)
                    except queue.Empty:
                        codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in dead)
                        raise RuntimeError(f"{where}: {codes} without reporting a result") from None
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(
                        f"{where}: ranks {missing} did not finish within {timeout} s"
                    ) from None
                else:
                    continue
            if not ok:
                raise RuntimeError(f"{where}: rank {rank} of {world_size} raised:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if len(outputs) == world_size else 0.0)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        results_q.close()
    return [outputs[r] for r in range(world_size)]
