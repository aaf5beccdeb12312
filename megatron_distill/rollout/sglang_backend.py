"""Client of an sglang server's native HTTP API, and its answers as a ``GenerationOutput``.

Used by ``--rollout-backend sglang`` (``sglang_rollout.py`` does the engine side: weight sync,
who sends, broadcasts). Two endpoints of sglang's HTTP server
(``python/sglang/srt/entrypoints/http_server.py``):

* ``POST /update_weights_from_disk`` ``{"model_path": DIR}``: the server reloads its weights from
  an HF directory (here: the student exported by the engine). Answers ``{"success", "message",
  "num_paused_requests"}``, HTTP 200 on success, 400 with ``success: false`` otherwise.
* ``POST /generate`` ``{"input_ids": [[...], ...], "sampling_params": {...}}``: one answer per
  prompt, in order, each ``{"output_ids": [...], "meta_info": {"finish_reason": {"type": "stop",
  "matched": ID} | {"type": "length", "length": N} | {"type": "abort", ...}, "completion_tokens",
  ...}, "text": ...}``. ``sampling_params`` keys (``sglang/srt/sampling/sampling_params.py``):
  ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p``, ``top_k`` (-1: off; 0 is refused),
  ``stop_token_ids``, ``no_stop_trim``.

With ``--api-key`` sglang expects ``Authorization: Bearer KEY``; the key is read from
``$MEGATRON_DISTILL_SGLANG_API_KEY``. Only the standard library is used (no ``requests``).

Checked only against a stand-in server that follows this format (tests/unit/test_sglang_backend.py),
not against a real sglang server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_distill.http_retry import request_once, with_retries
from megatron_distill.rollout.generate import GenerationOutput, assemble_output
from megatron_distill.rollout.sampling import SamplingParams

API_KEY_ENV = "MEGATRON_DISTILL_SGLANG_API_KEY"
GENERATE_PATH = "/generate"
UPDATE_WEIGHTS_PATH = "/update_weights_from_disk"
_BODY_CHARS = 500  # how much of an error body goes into a message


class SglangError(RuntimeError):
    """The sglang server refused a request or gave an unusable answer (names the URL)."""


class SglangUnavailableError(SglangError):
    """The sglang server did not answer after every retry (names the URL)."""


@dataclass(frozen=True)
class Completion:
    """One ``/generate`` answer: the generated ids and why generation ended.

    ``finish_type``: sglang's ``finish_reason.type`` (``"stop"``, ``"length"``, ``"abort"``);
    ``matched``: the stop token id (or stop string) for ``"stop"``, else None.
    """

    output_ids: list[int]
    finish_type: str
    matched: int | str | None = None


def sampling_payload(params: SamplingParams) -> dict[str, Any]:
    """Our ``SamplingParams`` as sglang's ``sampling_params`` dict.

    ``top_k`` 0 (off here) becomes -1 (off in sglang, which refuses 0); temperature 0 is greedy
    in both. ``no_stop_trim`` keeps the stop token in the answer (it belongs to the response and
    is trained on). ``params.seed`` is not sent: the server samples with its own RNG.
    """
    return {
        "max_new_tokens": int(params.max_new_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k > 0 else -1,
        "stop_token_ids": [int(t) for t in params.stop_token_ids],
        "no_stop_trim": True,
    }


class SglangClient:
    """Client of one sglang server.

    Args:
        url: ``http://host:port`` of the server.
        api_key: sent as ``Authorization: Bearer KEY`` (default ``$MEGATRON_DISTILL_SGLANG_API_KEY``;
            None or empty: no header).
        timeout_s: seconds per HTTP attempt (a whole batch's generation must fit in it).
        retries: further attempts after a connection error, timeout or HTTP 5xx; 4xx answers are
            not retried (a bad request stays bad).
        backoff_s: wait before the first retry, doubled for each next one.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0, retries: int = 3,
                 backoff_s: float = 1.0) -> None:
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"need retries >= 0, timeout_s > 0, backoff_s >= 0; got {retries}, {timeout_s}, "
                             f"{backoff_s}")
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)

    # ------------------------------------------------------------------ transport

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def post(self, path: str, payload: dict, what: str) -> Any:
        """POST ``payload`` as JSON to ``url + path`` with retries (megatron_distill/http_retry.py); the
        decoded JSON answer."""
        where = f"sglang server at {self.url}{path}"
        answer = with_retries(
            lambda: request_once(self.url + path, json.dumps(payload).encode(), self._headers(), self.timeout_s,
                                 lambda err: err.read().decode(errors="replace")[:_BODY_CHARS]),
            retries=self.retries, backoff_s=self.backoff_s,
            refused=lambda err: SglangError(f"{where} refused {what}: {err}"),
            unavailable=lambda last: SglangUnavailableError(
                f"{where} did not answer {what} after {self.retries + 1} attempt(s) "
                f"(timeout {self.timeout_s} s each, backoff from {self.backoff_s} s); last error: {last}"),
        )
        try:
            return json.loads(answer)
        except json.JSONDecodeError as err:
            raise SglangError(f"{where} answered {what} with invalid JSON: {err}") from None

    # ------------------------------------------------------------------ endpoints

    def update_weights_from_disk(self, model_path: str) -> dict:
        """Make the server load the HF checkpoint directory ``model_path`` (a path the server can read)."""
        answer = self.post(UPDATE_WEIGHTS_PATH, {"model_path": str(model_path)}, f"a weight update from {model_path}")
        if not isinstance(answer, dict) or not answer.get("success", False):
            raise SglangError(f"sglang server at {self.url}{UPDATE_WEIGHTS_PATH} did not load {model_path}: "
                              f"{str(answer)[:_BODY_CHARS]}")
        return answer

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Responses to ``prompt_ids`` (``b`` lists of token ids, no padding), one ``Completion`` each."""
        if not prompt_ids:
            return []
        what = f"a generate request ({len(prompt_ids)} prompts)"
        answer = self.post(GENERATE_PATH, {"input_ids": prompt_ids, "sampling_params": sampling_payload(params)},
                           what)
        if isinstance(answer, dict):  # a single prompt may be answered with a bare object
            answer = [answer]
        if not isinstance(answer, list) or len(answer) != len(prompt_ids):
            raise SglangError(f"sglang server at {self.url}{GENERATE_PATH}: expected {len(prompt_ids)} answers, "
                              f"got {str(answer)[:_BODY_CHARS]}")
        return [self._completion(item, i) for i, item in enumerate(answer)]

    def _completion(self, item: Any, i: int) -> Completion:
        where = f"sglang server at {self.url}{GENERATE_PATH}, answer {i}"
        if not isinstance(item, dict) or "output_ids" not in item:
            # Some sglang versions return token ids only when launched with --skip-tokenizer-init.
            raise SglangError(f"{where}: no 'output_ids' (launch the server with --skip-tokenizer-init if its "
                              f"version returns text only): {str(item)[:_BODY_CHARS]}")
        ids = item["output_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise SglangError(f"{where}: 'output_ids' must be a list of ints, got {str(ids)[:_BODY_CHARS]}")
        reason = (item.get("meta_info") or {}).get("finish_reason") or {}
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        if kind not in ("stop", "length"):
            raise SglangError(f"{where}: generation did not finish (finish_reason {reason!r})")
        return Completion(list(ids), kind, reason.get("matched") if isinstance(reason, dict) else None)


def _response_ids(c: Completion, params: SamplingParams) -> tuple[list[int], bool]:
    """The response as the in-place generator would give it, and whether a stop token ended it.

    The matched stop token is put back when the server left it out (the stop token is part of the
    response); the response ends at its first token in ``params.stop_token_ids``; it is cut to
    ``params.max_new_tokens`` (the room left in ``--seq-length`` + 1), and a response cut there
    counts as truncated. A server stop on another token (e.g. an EOS id of its own config) ends the
    response too.
    """
    ids = list(c.output_ids)
    if c.finish_type == "stop" and isinstance(c.matched, int) and (not ids or ids[-1] != c.matched):
        ids.append(c.matched)
    stops = set(params.stop_token_ids)
    first_stop = next((k for k, t in enumerate(ids) if t in stops), None)
    limit = params.max_new_tokens
    if first_stop is not None and first_stop < limit:
        return ids[: first_stop + 1], True
    if len(ids) > limit:
        return ids[:limit], False
    return ids, c.finish_type == "stop"


def completions_to_output(prompts: torch.Tensor, prompt_lengths: torch.Tensor, completions: list[Completion],
                          params: SamplingParams, *, vocab_size: int, pad_token_id: int, seconds: float,
                          url: str = "sglang") -> GenerationOutput:
    """The server's answers as the ``GenerationOutput`` ``generate()`` returns for the same prompts.

    ``prompts`` ``[b, P]`` right-padded (``prompt_lengths`` ``[b]``), the tensors sent; the result
    has ``tokens`` / ``response_mask`` ``[b, P + n]`` (``n`` the longest kept response), right-padded
    with ``pad_token_id``, on ``prompts``' device. Ids outside ``[0, vocab_size)`` raise ``SglangError``.
    """
    b = prompts.shape[0]
    if len(completions) != b:
        raise SglangError(f"{url}: {len(completions)} answers for {b} prompts")
    rows, finished = [], []
    for i, c in enumerate(completions):
        ids, done = _response_ids(c, params)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise SglangError(f"{url}: answer {i} holds token ids outside [0, {vocab_size}): {bad[:8]} "
                              "(does the server run the exported student?)")
        rows.append(ids)
        finished.append(done)
    n = max((len(r) for r in rows), default=0)
    generated = torch.full((b, n), pad_token_id, dtype=torch.int64)
    for i, ids in enumerate(rows):
        generated[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    device = prompts.device
    response_lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)
    return assemble_output(prompts, prompt_lengths.to(device=device, dtype=torch.int64), generated.to(device),
                           response_lengths, torch.tensor(finished, dtype=torch.bool, device=device),
                           pad_token_id, seconds)


__all__ = ["API_KEY_ENV", "Completion", "SglangClient", "SglangError", "SglangUnavailableError",
           "completions_to_output", "sampling_payload"]
