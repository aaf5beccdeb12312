"""A stand-in for an sglang server's native HTTP API, for tests (sglang itself needs a GPU).

It follows sglang's request and answer formats (``python/sglang/srt/entrypoints/http_server.py``,
``managers/io_struct.py``, ``sampling/sampling_params.py``, ``managers/tokenizer_manager.py``):

* ``POST /update_weights_from_disk`` ``{"model_path": DIR, ...}``: loads ``DIR`` with
  ``transformers.AutoModelForCausalLM`` (float32, eager attention); answers ``{"success": true,
  "message", "num_paused_requests": 0}`` (200) or ``success: false`` (400).
* ``POST /generate`` ``{"input_ids": [[...], ...] | [...], "sampling_params": {...} | [{...}, ...]}``:
  a list of ``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
  "completion_tokens", "cached_tokens"}}`` (a bare object for a single flat prompt).
  ``finish_reason`` is ``{"type": "stop", "matched": ID}`` or ``{"type": "length", "length": N}``.
  Sampling keys sglang does not know are refused (400), as sglang's ``SamplingParams(**kwargs)``
  does; so are ``top_k`` 0 and a negative temperature (sglang's ``verify``). Temperature 0 (below
  1e-6) is greedy; otherwise temperature, top-k and top-p sampling with a seeded generator.
* With ``api_key``, any request without ``Authorization: Bearer KEY`` gets 401, as sglang's
  ``add_api_key_middleware``.

Knobs for failure tests: ``fail_status`` (answer every request with that HTTP status),
``strip_stop`` (leave the matched stop token out of ``output_ids``), ``overshoot`` (generate that
many tokens past ``max_new_tokens``, a server ignoring the limit), ``next_token`` (a function of
the ids so far instead of a model). Everything received is recorded (``generate_requests``,
``update_paths``, ``loaded``: the state dict of each loaded model).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

# sglang's SamplingParams API fields (sampling/sampling_params.py).
SGLANG_SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}


class _BadRequest(Exception):
    pass


class SglangStandIn:
    """The stand-in server; ``start()`` returns its URL, ``stop()`` shuts it down."""

    def __init__(self, *, api_key: str | None = None, fail_status: int | None = None, strip_stop: bool = False,
                 overshoot: int = 0, next_token: Callable[[list[int]], int] | None = None, seed: int = 0):
        self.api_key, self.fail_status, self.strip_stop, self.overshoot = api_key, fail_status, strip_stop, overshoot
        self.next_token = next_token
        self.model = None
        self.eos_ids: set[int] = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()
        self.generate_requests: list[dict] = []
        self.update_paths: list[str] = []
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.attempts = 0
        self.headers: list[dict] = []
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = standin.handle(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ requests

    def handle(self, path: str, headers: dict, body: bytes) -> tuple[int, object]:
        with self.lock:
            self.attempts += 1
            self.headers.append(headers)
            if self.fail_status is not None:
                return self.fail_status, {"error": {"message": f"stand-in failure {self.fail_status}"}}
            if self.api_key and headers.get("Authorization") != f"Bearer {self.api_key}":
                return 401, {"error": "Unauthorized"}
            try:
                payload = json.loads(body)
                if path == "/update_weights_from_disk":
                    return self._update(payload)
                if path == "/generate":
                    return 200, self._generate(payload)
                return 404, {"detail": "Not Found"}
            except _BadRequest as err:
                return 400, {"error": {"message": str(err)}}

    def _update(self, payload: dict) -> tuple[int, dict]:
        from transformers import AutoModelForCausalLM

        path = payload.get("model_path")
        self.update_paths.append(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        except Exception as err:  # what sglang reports: success false, HTTP 400
            return 400, {"success": False, "message": f"Failed to update weights: {err}", "num_paused_requests": 0}
        self.model = model.eval()
        eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.loaded.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def _generate(self, payload: dict) -> list | dict:
        self.generate_requests.append(payload)
        ids = payload.get("input_ids")
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [ids] if single else ids
        if not prompts or not all(isinstance(p, list) and p for p in prompts):
            raise _BadRequest("input_ids must be a non-empty list of token id lists")
        params = payload.get("sampling_params") or {}
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        answers = [self._one(p, self._check(sp)) for p, sp in zip(prompts, per_prompt, strict=True)]
        return answers[0] if single else answers

    @staticmethod
    def _check(sp: dict) -> dict:
        unknown = set(sp) - SGLANG_SAMPLING_KEYS
        if unknown:  # sglang builds SamplingParams(**sp): an unknown keyword is an error
            raise _BadRequest(f"SamplingParams.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        top_k = sp.get("top_k", -1)
        if top_k is not None and (top_k < 1 and top_k != -1):
            raise _BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        if sp.get("temperature", 1.0) < 0:
            raise _BadRequest(f"temperature must be non-negative, got {sp['temperature']}.")
        if not 0.0 < sp.get("top_p", 1.0) <= 1.0:
            raise _BadRequest(f"top_p must be in (0, 1], got {sp['top_p']}.")
        return sp

    def _next(self, ids: list[int], sp: dict) -> int:
        if self.next_token is not None:
            return int(self.next_token(ids))
        if self.model is None:
            raise _BadRequest("no model loaded")
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, -1].double()
        temperature, top_k, top_p = sp.get("temperature", 1.0), sp.get("top_k", -1), sp.get("top_p", 1.0)
        if temperature < 1e-6:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_k and top_k > 0:
            kth = torch.topk(probs, min(top_k, probs.numel())).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.float(), 1, generator=self.gen))

    def _one(self, prompt: list[int], sp: dict) -> dict:
        limit = sp.get("max_new_tokens", 128) + self.overshoot
        stops = set(sp.get("stop_token_ids") or []) | self.eos_ids
        out: list[int] = []
        reason: dict = {"type": "length", "length": limit}
        while len(out) < limit:
            token = self._next(prompt + out, sp)
            out.append(token)
            if token in stops:
                reason = {"type": "stop", "matched": token}
                break
        completion = len(out)
        if self.strip_stop and reason["type"] == "stop":
            out = out[:-1]
        meta = {"id": uuid.uuid4().hex, "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": completion, "cached_tokens": 0}
        return {"text": "", "output_ids": out, "meta_info": meta}
