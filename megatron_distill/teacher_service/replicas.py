"""``ReplicaPool``: the teacher's Ray actors, their health, and the choice of replica per request.

Each replica is a Ray actor of ``TeacherModel`` created with ``max_restarts=-1``: when its
process dies, Ray starts a new one, which reloads the teacher. Calls sent to a restarting actor
are queued by Ray until it is back, so the pool keeps its own view of which replicas are
healthy. Death is observed as it happens: every healthy replica runs a sentinel call
(``TeacherModel.block``) in one of its threads, which fails as soon as Ray reports the actor
dead; the replica is then marked unhealthy and pinged (``info``) once per ``health_interval_s``
until it answers, restarted, with its new pid. Requests go round robin over healthy replicas
first; a request whose replica dies while it runs (``RayActorError``) goes to the next one at
once. Only when no replica is healthy does a request wait on a restarting one.
"""

from __future__ import annotations

import itertools
import threading
import time

import torch

from megatron_distill.teacher_service.model import TeacherModel

_SENTINEL_S = 3600.0  # a sentinel call's length; re-armed when it ends


class ReplicaPool:
    """``replicas`` Ray actors of ``TeacherModel``; the constructor waits until all have loaded.

    Args:
        teacher_load, dtype: as ``TeacherModel``.
        replicas: number of actors.
        cpus_per_replica, gpus_per_replica: Ray resources per actor (GPUs > 0: the actor runs on
            its GPU; torch threads = max(1, int(cpus_per_replica))).
        request_timeout_s: longest one replica may take for one request.
        health_interval_s: how often an unhealthy replica is pinged.
    """

    def __init__(self, teacher_load: str, dtype: str, replicas: int, cpus_per_replica: float = 1.0,
                 gpus_per_replica: float = 0.0, request_timeout_s: float = 600.0,
                 health_interval_s: float = 0.5) -> None:
        import ray

        actor_cls = ray.remote(TeacherModel).options(
            max_restarts=-1, max_task_retries=0, max_concurrency=3, num_cpus=cpus_per_replica,
            num_gpus=gpus_per_replica,
        )
        device = "cuda" if gpus_per_replica > 0 else "cpu"
        threads = max(1, int(cpus_per_replica))
        self.actors = [actor_cls.remote(teacher_load, dtype, device, threads) for _ in range(replicas)]
        infos = ray.get([a.info.remote() for a in self.actors])
        self.info = {"vocab_size": infos[0]["vocab_size"], "model": infos[0]["model"]}
        self._status = [{"alive": True, "pid": info["pid"]} for info in infos]
        self._timeout = request_timeout_s
        self._interval = health_interval_s
        self._next = itertools.count()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="teacher-health", daemon=True)
        self._monitor.start()

    def status(self) -> list[dict]:
        """Per replica ``{"alive": bool, "pid": int | None}``, as the health monitor last saw it."""
        return [dict(s) for s in self._status]

    def _watch(self) -> None:
        import ray
        from ray.exceptions import RayError

        sentinels = {self.actors[i].block.remote(_SENTINEL_S): i for i in range(len(self.actors))}
        pings: dict = {}
        last_ping = [0.0] * len(self.actors)
        while not self._stop.is_set():
            refs = list(sentinels) + list(pings)
            try:
                ready = ray.wait(refs, num_returns=1, timeout=self._interval)[0] if refs else []
            except Exception:  # Ray shutting down under us
                if self._stop.is_set():
                    return
                raise
            for ref in ready:
                if ref in sentinels:
                    i = sentinels.pop(ref)
                    try:
                        ray.get(ref)  # ran its course: re-arm
                        sentinels[self.actors[i].block.remote(_SENTINEL_S)] = i
                    except RayError:  # the replica died: re-armed once it answers a ping
                        self._status[i] = {"alive": False, "pid": None}
                else:
                    i = pings.pop(ref)
                    try:
                        self._status[i] = {"alive": True, "pid": ray.get(ref)["pid"]}
                        if i not in sentinels.values():
                            sentinels[self.actors[i].block.remote(_SENTINEL_S)] = i
                    except RayError:
                        pass
            now = time.monotonic()
            for i, status in enumerate(self._status):
                if not status["alive"] and i not in pings.values() and now - last_ping[i] >= self._interval:
                    pings[self.actors[i].info.remote()] = i
                    last_ping[i] = now

    def topk(self, tokens: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(ids [b, s, k], logprobs [b, s, k], replica index)`` from the first replica that answers.

        Raises RuntimeError when every replica died during the request, TimeoutError when the
        chosen replica takes longer than the request timeout.
        """
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        n, start = len(self.actors), next(self._next)
        order = sorted(((start + j) % n for j in range(n)), key=lambda i: not self._status[i]["alive"])
        errors = []
        for i in order:
            ref = self.actors[i].topk.remote(tokens, k, temperature)
            try:
                ids, logp = ray.get(ref, timeout=self._timeout)
                return ids, logp, i
            except RayActorError as err:  # died while answering: the next replica
                self._status[i] = {"alive": False, "pid": None}
                errors.append(f"replica {i}: {type(err).__name__}")
            except GetTimeoutError as err:
                ray.cancel(ref)
                raise TimeoutError(f"replica {i} did not answer within {self._timeout} s") from err
        raise RuntimeError("no replica could answer (" + "; ".join(errors) + ")")

    def close(self) -> None:
        """Stop the health monitor (the actors end with the Ray session)."""
        self._stop.set()
        self._monitor.join(timeout=5.0)
