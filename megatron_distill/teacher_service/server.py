"""The teacher service: Ray actors holding the teacher, behind a small HTTP front.

``TeacherService`` starts (or joins) Ray, creates the replicas (``replicas.ReplicaPool``: Ray
actors of ``TeacherModel``) and serves ``protocol.TOPK_PATH`` from a threaded ``http.server`` in
the calling process. Each request goes whole to one replica, round robin over the healthy ones;
concurrent requests run on different replicas. A killed replica is restarted by Ray while the
others serve (see replicas.py); a request no replica could answer gets 503, which
``RemoteTeacher`` retries with exponential backoff.

Security: the front binds to 127.0.0.1 by default. Binding any other address requires a shared
token (``--token`` or $MEGATRON_DISTILL_TEACHER_TOKEN): ``check_bind`` refuses to start
otherwise, naming the flag. With a token every request must carry ``Authorization: Bearer``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_distill.teacher_service import protocol
from megatron_distill.teacher_service.replicas import ReplicaPool


@dataclass(frozen=True)
class ServiceConfig:
    """What ``python -m megatron_distill.teacher_service`` configures (see ``__main__``)."""

    teacher_load: str
    topk: int = 256
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    dtype: str = "float32"
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    request_timeout_s: float = 600.0
    ray_address: str | None = None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} does not resolve: {err}") from err
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback ``host`` without a token (ValueError naming the flag / variable)."""
    if not token and not is_loopback(host):
        raise ValueError(
            f"--host {host} is not a loopback address: the teacher service then requires a shared token "
            f"(--token SECRET or ${protocol.TOKEN_ENV}); refusing to start without one"
        )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # no access log (errors go to the client as JSON)
        pass

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode())

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        got = self.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            return True
        self._error(401, "missing or wrong token (Authorization: Bearer <token>)")
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._authorized():
            return
        if self.path != protocol.INFO_PATH:
            return self._error(404, f"unknown path {self.path}")
        self._send(200, json.dumps({**self.server.info, "replica_status": self.server.pool.status()}).encode())

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > protocol.MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413, f"request body over {protocol.MAX_BODY_BYTES} bytes")
        body = self.rfile.read(length)
        if not self._authorized():
            return
        if self.path != protocol.TOPK_PATH:
            return self._error(404, f"unknown path {self.path}")
        try:
            request_id, tokens, temperature, k = protocol.decode_request(body)
            vocab = self.server.info["vocab_size"]
            if k > min(vocab, self.server.info["topk"]):
                raise protocol.ProtocolError(
                    f"request {request_id!r}: topk {k} exceeds the service's --topk ({self.server.info['topk']}) "
                    f"or the teacher's vocabulary ({vocab})"
                )
            if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
                raise protocol.ProtocolError(f"request {request_id!r}: token ids outside [0, {vocab})")
        except protocol.ProtocolError as err:
            return self._error(400, str(err))
        try:
            ids, logp, replica = self.server.pool.topk(tokens, k, temperature)
        except (RuntimeError, TimeoutError) as err:
            return self._error(503, f"request {request_id!r}: {err}")
        except Exception as err:  # a replica raised: report it, keep serving
            return self._error(500, f"request {request_id!r}: {type(err).__name__}: {err}")
        answer = protocol.encode_answer(request_id, tokens, ids, logp, temperature, vocab, replica)
        self._send(200, answer, "application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    pool: ReplicaPool
    token: str | None
    info: dict

    def __init__(self, address, pool, token, info) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.pool, self.token, self.info = pool, token, info


class TeacherService:
    """Ray replicas + HTTP front. ``start()`` returns once every replica has loaded the teacher.

    ``address`` is ``http://host:port`` (the port the OS chose when ``cfg.port`` is 0).
    ``stop()`` closes the front; Ray is shut down only if this object started it.
    """

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.token = cfg.token or os.environ.get(protocol.TOKEN_ENV) or None
        check_bind(cfg.host, self.token)
        if cfg.replicas < 1 or cfg.topk < 1:
            raise ValueError(f"--replicas ({cfg.replicas}) and --topk ({cfg.topk}) must be >= 1")
        self.pool: ReplicaPool | None = None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._owns_ray = False

    def start(self) -> TeacherService:
        import ray

        if not ray.is_initialized():
            # workers must import this package even when it is not pip-installed
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(address=self.cfg.ray_address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
            self._owns_ray = True
        cfg = self.cfg
        self.pool = ReplicaPool(cfg.teacher_load, cfg.dtype, cfg.replicas, cfg.cpus_per_replica,
                                cfg.gpus_per_replica, cfg.request_timeout_s)
        info = {**self.pool.info, "topk": self.cfg.topk, "replicas": self.cfg.replicas}
        self._httpd = _Server((self.cfg.host, self.cfg.port), self.pool, self.token, info)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="teacher-http", daemon=True)
        self._thread.start()
        return self

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.pool is not None:
            self.pool.close()
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> TeacherService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
