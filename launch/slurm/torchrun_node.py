#!/usr/bin/env python3
"""``torchrun`` for one node of a Slurm job, as the templates of launch/slurm/ start it.

    python launch/slurm/torchrun_node.py <torchrun arguments> launch/pretrain_distill.py <flags>

Same arguments and behaviour as ``torchrun``, with the two changes the requeue logic of
``distill.sbatch`` / ``teacher_service.sbatch`` needs (both checked with torch 2.13's torchrun):

1. Exit status. Plain torchrun exits 1 whenever a worker fails, whatever the worker's own exit
   code, so the trainer's 75 (preempted, checkpoint saved) would never reach the batch script.
   This exits with the workers' code (``node_exit_code``): 75 when the failed workers exited 75
   or were killed by a signal afterwards (torchrun stops the rest of the group once one worker
   has exited); otherwise the exit code of the lowest failed rank that exited by itself; 128 + N
   when every failed worker was killed by signal N.
2. SIGTERM / SIGUSR1. Plain torchrun answers SIGTERM by sending SIGTERM to its workers and
   SIGKILL 30 s later, which cuts a large checkpoint save short, and dies of SIGUSR1. Here both
   signals are forwarded (the same signal) to the workers and torchrun keeps waiting: the workers
   finish the iteration, save a checkpoint and exit 75. A signal that arrives while no worker
   runs (rendezvous) stops torchrun and exits 75: nothing to save, requeue. SIGINT, SIGHUP and
   SIGQUIT keep torchrun's own handling.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_PREEMPTED = 75  # megatron_distill.resilience.EXIT_PREEMPTED (not imported: no package import here)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def node_exit_code(failures: dict[int, int]) -> int:
    """The node's exit code from the failed workers' exit codes (rank -> code; < 0: killed by -code)."""
    if not failures:
        return 0
    codes = [failures[rank] for rank in sorted(failures)]
    own = [code for code in codes if code > 0]  # exited by themselves
    if own and all(code == EXIT_PREEMPTED for code in own):
        return EXIT_PREEMPTED
    other = [code for code in own if code != EXIT_PREEMPTED]
    if other:
        return other[0]
    return 128 + abs(codes[0]) if codes[0] < 0 else 1


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (default: this process), from /proc: torchrun's workers."""
    pid = os.getpid() if pid is None else pid
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid ...
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)


class _Forwarder:
    """Forwards SIGTERM / SIGUSR1 to the workers instead of letting torchrun stop them."""

    def __init__(self) -> None:
        self.forwarded = False

    def __call__(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        workers = child_pids()
        if workers:
            print(f"torchrun_node: got {name}: forwarding it to worker(s) {workers} (they save a checkpoint "
                  "and exit 75); torchrun keeps waiting", file=sys.stderr, flush=True)
            for pid in workers:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            self.forwarded = True
        elif not self.forwarded:  # no worker to save anything: stop torchrun (exit 75 below)
            from torch.distributed.elastic.multiprocessing.api import SignalException

            raise SignalException(f"torchrun_node got {name} while no worker runs", sigval=signal.Signals(signum))


def main(argv: list[str] | None = None) -> int:
    forward = _Forwarder()
    for sig in STOP_SIGNALS:  # before torch's import: a signal during the start-up is handled too
        signal.signal(sig, forward)

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as mp_api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun installs ``_terminate_process_handler`` (raise SignalException -> stop the workers, SIGKILL
    # 30 s later) for SIGTERM when it starts the workers; it looks the name up in its module then.
    original = mp_api._terminate_process_handler

    def handler(signum: int, frame) -> None:
        if signum in STOP_SIGNALS:
            return forward(signum, frame)
        return original(signum, frame)

    mp_api._terminate_process_handler = handler
    try:
        torchrun.main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as err:
        failures = {rank: failure.exitcode for rank, failure in err.failures.items()}
        code = node_exit_code(failures)
        print(f"torchrun_node: worker exit codes {failures} -> exit {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        if err.sigval in STOP_SIGNALS:
            print(f"torchrun_node: stopped by {err.sigval.name} before the workers ran -> exit {EXIT_PREEMPTED}",
                  file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
