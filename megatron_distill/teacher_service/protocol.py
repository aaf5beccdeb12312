"""Wire format of the teacher service, shared by the server and ``RemoteTeacher``.

One endpoint answers top-k requests: ``POST /v1/topk``, body and answer in the safetensors
format (no pickle on either side; tensors travel as raw bytes, metadata as strings):

* request: tensor ``tokens`` ``[b, s]`` int64; metadata ``request_id`` (any string),
  ``temperature`` (float > 0), ``topk`` (int >= 1), ``tokens_sha256`` (``tokens_digest``);
* answer (200): tensors ``topk_ids`` ``[b, s, K]`` int64 and ``topk_logprobs`` ``[b, s, K]``
  float32 (log-probs of ``softmax(logits / temperature)`` over the teacher's full vocabulary,
  largest first); metadata echoes ``request_id``, ``temperature``, ``topk`` and the digest of the
  tokens the server actually scored (``tokens_sha256``), plus ``vocab_size`` and ``replica``.
* errors: a JSON object ``{"error": message}`` with 400 (bad request), 401 (token), 503 (no
  replica could answer) or 500.

``GET /v1/info`` returns JSON ``{"vocab_size", "topk", "replicas", "model", "replica_status"}``
(per replica ``{"alive", "pid"}``). When the server has a token, every request must carry
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

TOPK_PATH = "/v1/topk"
INFO_PATH = "/v1/info"
TOKEN_ENV = "MEGATRON_DISTILL_TEACHER_TOKEN"
MAX_BODY_BYTES = 1 << 30


class ProtocolError(ValueError):
    """A malformed request or answer; the message says which field is wrong."""


def tokens_digest(tokens: torch.Tensor) -> str:
    """sha256 (hex) of a token batch ``[b, s]``: its shape and its values as little-endian int64."""
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(("x".join(map(str, t.shape)) + ";").encode())
    h.update(t.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def encode_request(request_id: str, tokens: torch.Tensor, temperature: float, topk: int) -> bytes:
    """Request body for ``tokens`` ``[b, s]`` (any integer dtype; sent as int64)."""
    tokens = tokens.detach().to("cpu", torch.int64).contiguous()
    meta = {"request_id": str(request_id), "temperature": repr(float(temperature)), "topk": str(int(topk)),
            "tokens_sha256": tokens_digest(tokens)}
    return st_save({"tokens": tokens}, metadata=meta)


def _load(body: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors payload (the header: 8-byte length + JSON)."""
    try:
        tensors = st_load(body)
        (n,) = struct.unpack("<Q", body[:8])
        meta = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
    except Exception as err:  # safetensors / json / struct raise several types on garbage
        raise ProtocolError(f"{what} is not a safetensors payload ({err})") from err
    return tensors, {str(k): str(v) for k, v in meta.items()}


def decode_request(body: bytes) -> tuple[str, torch.Tensor, float, int]:
    """``(request_id, tokens [b, s] int64, temperature, topk)``; ProtocolError names a bad field."""
    tensors, meta = _load(body, "request body")
    for key in ("request_id", "temperature", "topk"):
        if key not in meta:
            raise ProtocolError(f"request lacks metadata field {key!r}")
    tokens = tensors.get("tokens")
    if tokens is None or tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.numel() == 0:
        raise ProtocolError("request tensor 'tokens' must be a non-empty [batch, seq] int64 tensor")
    try:
        temperature, topk = float(meta["temperature"]), int(meta["topk"])
    except ValueError as err:
        raise ProtocolError(f"request temperature / topk are not numbers: {err}") from err
    if not temperature > 0.0 or temperature == float("inf"):
        raise ProtocolError(f"request temperature must be a finite number > 0, got {temperature}")
    if topk < 1:
        raise ProtocolError(f"request topk must be >= 1, got {topk}")
    sent = meta.get("tokens_sha256")
    if sent is not None and sent != tokens_digest(tokens):
        raise ProtocolError(f"request {meta['request_id']!r}: tokens_sha256 does not match the tokens sent")
    return meta["request_id"], tokens, temperature, topk


def encode_answer(request_id: str, tokens: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                  temperature: float, vocab_size: int, replica: int) -> bytes:
    """Answer body: ``ids`` ``[b, s, K]`` int64, ``logprobs`` ``[b, s, K]`` float32."""
    meta = {"request_id": request_id, "tokens_sha256": tokens_digest(tokens), "topk": str(ids.shape[-1]),
            "temperature": repr(float(temperature)), "vocab_size": str(int(vocab_size)), "replica": str(replica)}
    return st_save({"topk_ids": ids.to(torch.int64).contiguous(),
                    "topk_logprobs": logprobs.to(torch.float32).contiguous()}, metadata=meta)


def decode_answer(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an answer, unchecked (``RemoteTeacher`` validates them)."""
    return _load(body, "teacher answer")
