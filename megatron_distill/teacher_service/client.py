"""Trainer-side client of the teacher service: ``RemoteTeacher``.

Typical use, one step ahead (the request for step i + 1 is in flight while step i trains)::

    teacher = RemoteTeacher("http://teacher:8765", token, topk=256, vocab_size=V)
    teacher.prefetch(0, tokens_0, temperature=tau)
    for i in range(n):
        if i + 1 < n:
            teacher.prefetch(i + 1, tokens[i + 1], temperature=tau)
        ids, logprobs = teacher.get(i, tokens[i])      # [b, s, K] int64, [b, s, K] float32
        loss = topk_distill_loss(student_logits, ids, logprobs, ...)

``get`` checks that the answer echoes the request id AND the sha256 of the very tokens passed
to ``get`` (so an answer computed for other tokens, e.g. a stale prefetch, is never used) and
validates the tensors; any mismatch raises ``TeacherAnswerError`` naming the request. Transport
failures (connection refused, timeouts, 5xx) are retried ``retries`` times with exponential
backoff (``backoff_s``, ``2 backoff_s``, ...); then ``TeacherUnavailableError`` names the
address. 4xx answers (bad request, wrong token) are not retried.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from megatron_distill.http_retry import request_once, with_retries
from megatron_distill.teacher_service import protocol


class TeacherServiceError(RuntimeError):
    """Base class of the client's errors."""


class TeacherUnavailableError(TeacherServiceError):
    """The service did not answer after every retry (the message names the address)."""


class TeacherAnswerError(TeacherServiceError):
    """An answer that does not belong to the request or is malformed (names the request)."""


class RemoteTeacher:
    """Client of one teacher service.

    Args:
        address: ``http://host:port`` of the service.
        token: the shared token (default $MEGATRON_DISTILL_TEACHER_TOKEN; None: send none).
        timeout_s: seconds per HTTP attempt (connect + answer).
        retries: further attempts after a failed one.
        backoff_s: wait before the first retry; doubled for each next one.
        topk: K to request (None: the service's default, read from ``/v1/info``).
        vocab_size: every answered id must lie in ``[0, vocab_size)`` (None: the teacher's
            vocabulary, from ``/v1/info``). Pass the student's real vocabulary size.
    """

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 120.0, retries: int = 3,
                 backoff_s: float = 1.0, *, topk: int | None = None, vocab_size: int | None = None) -> None:
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(
                f"need retries >= 0, timeout_s > 0, backoff_s >= 0; got {retries}, {timeout_s}, {backoff_s}"
            )
        self.address = address.rstrip("/")
        self.token = token if token is not None else os.environ.get(protocol.TOKEN_ENV)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.topk, self.vocab_size = topk, vocab_size
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="remote-teacher")
        self._pending: dict[str, tuple[Future, str, float]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ transport

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    @staticmethod
    def _error_text(err: urllib.error.HTTPError) -> str:
        try:
            return str(json.loads(err.read()).get("error", ""))
        except Exception:
            return str(err.reason)

    def _call(self, path: str, body: bytes | None, what: str) -> bytes:
        """POST (or GET without a body) with retries (megatron_distill/http_retry.py); raises the client's errors."""
        return with_retries(
            lambda: request_once(self.address + path, body, self._headers(), self.timeout_s, self._error_text),
            retries=self.retries, backoff_s=self.backoff_s,
            refused=lambda err: TeacherServiceError(f"teacher service at {self.address} refused {what}: {err}"),
            unavailable=lambda last: TeacherUnavailableError(
                f"teacher service at {self.address} did not answer {what} after {self.retries + 1} attempt(s) "
                f"(timeout {self.timeout_s} s each, backoff from {self.backoff_s} s); last error: {last}"),
        )

    def info(self) -> dict:
        """The service's ``/v1/info``: ``{"vocab_size", "topk", "replicas", "model", "replica_status"}``."""
        return json.loads(self._call(protocol.INFO_PATH, None, "an info request"))

    def _resolve_defaults(self) -> None:
        if self.topk is None or self.vocab_size is None:
            info = self.info()
            self.topk = self.topk or int(info["topk"])
            self.vocab_size = self.vocab_size or int(info["vocab_size"])

    # ------------------------------------------------------------------ requests

    def prefetch(self, request_id: str | int, tokens: torch.Tensor, temperature: float = 1.0) -> None:
        """Send the request for ``tokens`` ``[b, s]`` (integer ids) in a background thread.

        ``temperature`` is applied by the service before its softmax and top-k (use the loss's
        temperature). A second prefetch of a pending ``request_id`` is an error.
        """
        rid = str(request_id)
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.numel() == 0:
            raise ValueError(f"request {rid!r}: tokens must be a non-empty [batch, seq] integer tensor, "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if not temperature > 0.0:
            raise ValueError(f"request {rid!r}: temperature must be > 0, got {temperature}")
        self._resolve_defaults()
        body = protocol.encode_request(rid, tokens, temperature, self.topk)
        with self._lock:
            if rid in self._pending:
                raise ValueError(f"request {rid!r} is already pending")
            future = self._pool.submit(self._call, protocol.TOPK_PATH, body, f"request {rid!r}")
            self._pending[rid] = (future, protocol.tokens_digest(tokens), float(temperature))

    def get(self, request_id: str | int, tokens: torch.Tensor, temperature: float | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k for ``tokens`` ``[b, s]``: ``(ids [b, s, K] int64, logprobs [b, s, K] float32)``.

        Waits for the prefetched request ``request_id`` (sends it now if it was not prefetched,
        at ``temperature`` or 1.0). Raises ``TeacherAnswerError`` when the answer is not the one
        for this id and these tokens, or is malformed; ``TeacherUnavailableError`` when the
        service did not answer.
        """
        rid = str(request_id)
        with self._lock:
            pending = self._pending.pop(rid, None)
        if pending is None:
            self.prefetch(rid, tokens, 1.0 if temperature is None else temperature)
            with self._lock:
                pending = self._pending.pop(rid)
        future, _, sent_temperature = pending
        if temperature is not None and temperature != sent_temperature:
            raise TeacherAnswerError(f"request {rid!r} was sent at temperature {sent_temperature}, not {temperature}")
        body = future.result()
        try:
            tensors, meta = protocol.decode_answer(body)
        except protocol.ProtocolError as err:
            raise TeacherAnswerError(f"request {rid!r}: {err}") from None
        if meta.get("request_id") != rid:
            raise TeacherAnswerError(f"answer for request {meta.get('request_id')!r} received for request {rid!r}")
        if meta.get("tokens_sha256") != protocol.tokens_digest(tokens):
            raise TeacherAnswerError(
                f"request {rid!r}: the answer was computed for other tokens than those passed to get() "
                f"(token hash mismatch: stale or mismatched answer)"
            )
        ids, logp = tensors.get("topk_ids"), tensors.get("topk_logprobs")
        self.validate(rid, tuple(tokens.shape), ids, logp)
        return ids, logp

    def validate(self, rid: str, token_shape: tuple[int, ...], ids: torch.Tensor | None,
                 logp: torch.Tensor | None) -> None:
        """Raise ``TeacherAnswerError`` naming what is wrong with an answer to request ``rid``."""

        def bad(what: str) -> TeacherAnswerError:
            return TeacherAnswerError(f"request {rid!r}: invalid teacher answer: {what}")

        if ids is None or logp is None:
            raise bad("topk_ids / topk_logprobs missing")
        shape = (*token_shape, self.topk)
        if tuple(ids.shape) != shape or tuple(logp.shape) != shape:
            raise bad(f"shapes {tuple(ids.shape)} / {tuple(logp.shape)}, expected {shape} (K = {self.topk})")
        if ids.dtype != torch.int64 or logp.dtype != torch.float32:
            raise bad(f"dtypes {ids.dtype} / {logp.dtype}, expected torch.int64 / torch.float32")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise bad(f"ids outside [0, {self.vocab_size}) (min {int(ids.min())}, max {int(ids.max())})")
        if not bool(torch.isfinite(logp).all()):
            raise bad("log-probs not finite")
        if bool((logp > 0).any()):
            raise bad(f"log-probs > 0 (max {float(logp.max())})")
        if self.topk > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise bad("repeated ids within a position")
        if float(torch.logsumexp(logp, dim=-1).max()) > 1e-3:
            raise bad("top-k probabilities sum to more than 1 at some position")

    def close(self) -> None:
        """Stop the background thread (pending requests are abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["RemoteTeacher", "TeacherAnswerError", "TeacherServiceError", "TeacherUnavailableError"]
