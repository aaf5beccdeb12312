"""``python -m megatron_distill.teacher_service``: serve a teacher's top-k log-probs over HTTP.

Example (4 replicas of one GPU each on this host, reachable from the training nodes)::

    MEGATRON_DISTILL_TEACHER_TOKEN=$(openssl rand -hex 16) python -m megatron_distill.teacher_service \\
        --teacher-load /models/Llama-3.1-70B-Instruct --dtype bfloat16 --topk 256 --replicas 4 \\
        --gpus-per-replica 1 --host 0.0.0.0 --port 8765

Prints ``teacher service listening on http://HOST:PORT`` once every replica has loaded the
teacher, then serves until interrupted. Exit code 2 for a configuration error (named flag).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from megatron_distill.models.hf_config import hf_architecture, read_hf_config
from megatron_distill.teacher_service import protocol
from megatron_distill.teacher_service.server import ServiceConfig, TeacherService, check_bind


def parse_args(argv: list[str] | None = None) -> ServiceConfig:
    p = argparse.ArgumentParser(prog="python -m megatron_distill.teacher_service", description=__doc__.split("\n")[0])
    p.add_argument("--teacher-load", required=True, metavar="DIR",
                   help="local Hugging Face teacher directory (Llama 3.x, Qwen2/2.5, Qwen3; safetensors)")
    p.add_argument("--topk", type=int, default=256, help="K: default and largest top-k a request may ask for")
    p.add_argument("--replicas", type=int, default=1, help="number of Ray actors holding the teacher")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; non-loopback needs --token")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0: any free port)")
    p.add_argument("--token", default=None,
                   help=f"shared secret clients must send (default ${protocol.TOKEN_ENV}); required off loopback")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs (and torch threads) per replica")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per replica (0: run on the CPU)")
    p.add_argument("--request-timeout-s", type=float, default=600.0, help="longest a replica may take per request")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    a = p.parse_args(argv)
    token = a.token or os.environ.get(protocol.TOKEN_ENV) or None
    for name, value in (("--topk", a.topk), ("--replicas", a.replicas)):
        if value < 1:
            p.error(f"{name} must be >= 1, got {value}")
    try:  # before any replica starts: an unsupported teacher fails at once
        hf_architecture(*read_hf_config(a.teacher_load))
    except (OSError, ValueError) as err:
        p.error(f"--teacher-load {a.teacher_load}: {err}")
    try:
        check_bind(a.host, token)
    except ValueError as err:
        p.error(str(err))
    return ServiceConfig(
        teacher_load=a.teacher_load, topk=a.topk, replicas=a.replicas, host=a.host, port=a.port, token=token,
        dtype=a.dtype, cpus_per_replica=a.cpus_per_replica, gpus_per_replica=a.gpus_per_replica,
        request_timeout_s=a.request_timeout_s, ray_address=a.ray_address,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    stop = threading.Event()
    with TeacherService(cfg) as service:
        # after Ray's start-up, which installs its own SIGTERM handler in this process
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(f"teacher service listening on {service.address} ({cfg.replicas} replica(s), top-{cfg.topk}, "
              f"token {'required' if service.token else 'not required'})", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
