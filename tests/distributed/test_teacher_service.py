"""The remote top-k teacher: ``python -m megatron_distill.teacher_service`` with real Ray, and
``RemoteTeacher``, on the CPU.

With Ray (skipped, saying so, when ``ray`` is not installed: ``pip install "ray>=2.9"``): the
service is started as its command line does it, as a subprocess (2 replicas, a token from
$MEGATRON_DISTILL_TEACHER_TOKEN, a tiny random HF Llama saved to a temporary directory), and
checked for:

* round trip, one step ahead (prefetch i + 1 before get i): the answers equal the tiny teacher's
  top-k computed directly with transformers (ids equal, log-probs to 1e-5) at several
  temperatures, and both replicas answer;
* a killed replica (its process SIGKILLed, as a crash would): the service marks it unhealthy
  and the other replica answers every request at once while Ray restarts the killed one (new
  pid), which then serves again; with every replica killed, a request waits for Ray's restart
  and is answered;
* a missing or wrong token is refused (401, not retried); stale tokens (``get`` with tokens
  other than those prefetched) are detected by the echoed hash;
* the command line refuses a non-loopback ``--host`` without a token (exit 2, naming --token).

Without Ray (stand-ins, by necessity: a real service cannot be made to lie or hang on demand):
an endpoint that accepts connections and never answers and a closed port (the client raises
after its retries, naming the address); a server answering 503 twice and then correctly (the
client's backoff retries succeed); and servers whose answers echo the wrong request id or hash
or are malformed (shape, dtype, K, ids out of range or repeated, log-probs > 0 or not finite):
each raises ``TeacherAnswerError`` naming the request and the problem.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from megatron_distill.teacher_service import (
    TOKEN_ENV,
    RemoteTeacher,
    TeacherAnswerError,
    TeacherServiceError,
    TeacherUnavailableError,
    protocol,
)
from megatron_distill.teacher_service.server import check_bind
from tests._teacher_service import start_service

REPO = Path(__file__).resolve().parents[2]
VOCAB, K, TOKEN = 101, 8, "test-token-0123"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _direct_topk(model, tokens: torch.Tensor, k: int, tau: float):
    with torch.no_grad():
        return torch.log_softmax(model(tokens).logits.float() / tau, dim=-1).topk(k, dim=-1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(directory, model): a tiny random HF Llama (2 layers, hidden 32, vocab 101)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peakier than the default init, so top-k ids are well separated
        model.get_output_embeddings().weight.mul_(20.0)
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    return str(path), model.eval()


@pytest.fixture(scope="module")
def service(teacher):
    """The address of a running 2-replica service (a subprocess, stopped with SIGTERM)."""
    pytest.importorskip("ray", reason='the teacher service needs Ray: pip install "ray>=2.9"')
    address, proc, lines = start_service(teacher[0], K, 2, env=_env(**{TOKEN_ENV: TOKEN}))
    yield address
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()


def _client(address, **kw) -> RemoteTeacher:
    return RemoteTeacher(address, kw.pop("token", TOKEN), kw.pop("timeout_s", 60.0), kw.pop("retries", 2),
                         kw.pop("backoff_s", 0.2), topk=K, vocab_size=VOCAB, **kw)


def _raw_replica(address, tokens) -> int:
    """Which replica answered a request sent directly (bypassing RemoteTeacher)."""
    import urllib.request

    req = urllib.request.Request(address + protocol.TOPK_PATH, data=protocol.encode_request("raw", tokens, 1.0, K),
                                 headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return int(protocol.decode_answer(resp.read())[1]["replica"])


def _wait_for(cond, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- with Ray


def test_round_trip_one_step_ahead_matches_direct_topk(service, teacher):
    model = teacher[1]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(4)]
    temps = [1.0, 0.7, 1.0, 2.5]
    with _client(service) as client:
        client.prefetch(0, batches[0], temperature=temps[0])
        for i, tokens in enumerate(batches):
            if i + 1 < len(batches):
                client.prefetch(i + 1, batches[i + 1], temperature=temps[i + 1])
            ids, logp = client.get(i, tokens)
            ref_logp, ref_ids = _direct_topk(model, tokens, K, temps[i])
            assert ids.shape == (2, 12, K) and ids.dtype == torch.int64 and logp.dtype == torch.float32
            assert torch.equal(ids, ref_ids), f"request {i}"
            torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
        info = client.info()
    assert info["vocab_size"] == VOCAB and info["topk"] == K and info["replicas"] == 2
    assert {_raw_replica(service, batches[0]) for _ in range(2)} == {0, 1}


def test_killed_replica_other_serves_and_ray_restarts_it(service, teacher):
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    ref_logp, ref_ids = _direct_topk(teacher[1], tokens, K, 1.0)
    with _client(service) as client:
        status = _wait_for(lambda: (s := client.info()["replica_status"]) and all(r["alive"] for r in s) and s,
                           "both replicas healthy")
        old_pid = status[0]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        _wait_for(lambda: not client.info()["replica_status"][0]["alive"], "replica 0 marked unhealthy", 30)
        served = []
        for i in range(3):  # answered by replica 1 while replica 0 restarts (no timing asserted: a loaded
            served.append(_raw_replica(service, tokens))  # CI machine makes durations meaningless)
            ids, logp = client.get(f"after-kill-{i}", tokens)
            assert torch.equal(ids, ref_ids)
        if 0 in served:  # only possible once Ray has restarted it (seconds: a new process loads the teacher)
            assert client.info()["replica_status"][0]["pid"] not in (None, old_pid), served
        status = _wait_for(lambda: (s := client.info()["replica_status"])[0]["alive"] and s, "replica 0 restarted")
        assert status[0]["pid"] not in (None, old_pid)
        _wait_for(lambda: _raw_replica(service, tokens) == 0, "the restarted replica to serve", 30)
        # every replica killed: the request waits for Ray's restart and is answered
        for r in client.info()["replica_status"]:
            os.kill(r["pid"], signal.SIGKILL)
    # Restarting both replicas can take a while on a loaded machine: a patient client.
    with _client(service, retries=12, backoff_s=1.0) as client:
        ids, logp = client.get("all-killed", tokens)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)


def test_token_is_required_and_stale_tokens_are_detected(service, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    for token in (None, "wrong"):
        with _client(service, token=token, retries=3, backoff_s=5.0) as client:
            t0 = time.monotonic()
            with pytest.raises(TeacherServiceError, match="HTTP 401"):
                client.get("no-token", tokens)
            assert time.monotonic() - t0 < 5.0, "a 401 must not be retried"
    with _client(service) as client:
        client.prefetch("step-7", tokens)
        other = tokens.clone()
        other[1, 3] = (other[1, 3] + 1) % VOCAB
        with pytest.raises(TeacherAnswerError, match=r"'step-7'.*hash mismatch"):
            client.get("step-7", other)


def test_cli_refuses_non_loopback_host_without_token(teacher):
    cmd = [sys.executable, "-m", "megatron_distill.teacher_service", "--teacher-load", teacher[0], "--host", "0.0.0.0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert out.returncode == 2 and "--token" in out.stderr and TOKEN_ENV in out.stderr, out.stderr
    with pytest.raises(ValueError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "secret")
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)


# ----------------------------------------------------------------------------- stand-ins


class _StandIn(ThreadingHTTPServer):
    """A fake teacher service: answers ``mode`` (see ``_answer``); ``fail_first`` 503s first."""

    daemon_threads = True

    def __init__(self, mode: str = "ok", fail_first: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.mode, self.fail_left, self.requests = mode, fail_first, 0
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _answer(mode: str, rid: str, tokens: torch.Tensor, k: int) -> bytes:
    g = torch.Generator().manual_seed(0)
    logp, ids = torch.log_softmax(torch.randn(*tokens.shape, VOCAB, generator=g) * 3, -1).topk(k, dim=-1)
    digest = protocol.tokens_digest(tokens)
    if mode == "wrong_id":
        rid = rid + "-other"
    elif mode == "wrong_hash":
        digest = protocol.tokens_digest(tokens + 1)
    elif mode == "shape":
        ids, logp = ids[:, :-1], logp[:, :-1]
    elif mode == "wrong_k":
        ids, logp = ids[..., :-1], logp[..., :-1]
    elif mode == "dtype":
        ids = ids.to(torch.int32)
    elif mode == "range":
        ids[0, 0, 0] = VOCAB
    elif mode == "repeat":
        ids[0, 0, 1] = ids[0, 0, 0]
    elif mode == "positive":
        logp[0, 0, 0] = 0.5
    elif mode == "nan":
        logp[0, 0, 0] = float("nan")
    meta = {"request_id": rid, "tokens_sha256": digest, "topk": str(k), "temperature": "1.0",
            "vocab_size": str(VOCAB), "replica": "0"}
    return st_save({"topk_ids": ids.contiguous(), "topk_logprobs": logp.contiguous()}, metadata=meta)


class _StandInHandler(BaseHTTPRequestHandler):
    server: _StandIn

    def log_message(self, fmt, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests += 1
        if self.server.fail_left > 0:
            self.server.fail_left -= 1
            payload, code = json.dumps({"error": "no replica could answer"}).encode(), 503
        else:
            rid, tokens, _, k = protocol.decode_request(body)
            payload, code = _answer(self.server.mode, rid, tokens, k), 200
        self.send_response(code)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _stand_in_client(address, **kw) -> RemoteTeacher:
    return RemoteTeacher(address, None, kw.pop("timeout_s", 10.0), kw.pop("retries", 0), kw.pop("backoff_s", 0.05),
                         topk=4, vocab_size=VOCAB)


def test_timeouts_and_refused_connections_raise_after_retries_naming_the_address():
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # accepts connections (backlog) and never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    tokens = torch.zeros(1, 3, dtype=torch.int64)
    try:
        for port, timeout in ((hung.getsockname()[1], 0.4), (closed_port, 5.0)):
            address = f"http://127.0.0.1:{port}"
            with _stand_in_client(address, timeout_s=timeout, retries=2, backoff_s=0.1) as client:
                client.prefetch("r1", tokens)
                t0 = time.monotonic()
                with pytest.raises(TeacherUnavailableError, match=re.escape(address) + r".*'r1' after 3 attempt"):
                    client.get("r1", tokens)
                assert time.monotonic() - t0 < 3 * timeout + 0.3 + 2.0
    finally:
        hung.close()


def test_client_retries_with_backoff_until_the_service_answers():
    tokens = torch.arange(6).view(2, 3)
    with _StandIn("ok", fail_first=2) as server, _stand_in_client(server.address, retries=3, backoff_s=0.1) as client:
        t0 = time.monotonic()
        ids, logp = client.get(5, tokens)
        assert time.monotonic() - t0 >= 0.1 + 0.2  # two backoffs: 0.1 s, then 0.2 s
        assert server.requests == 3 and ids.shape == (2, 3, 4)


@pytest.mark.parametrize(("mode", "message"), [
    ("wrong_id", "received for request '7'"),
    ("wrong_hash", "hash mismatch"),
    ("shape", "shapes"),
    ("wrong_k", "K = 4"),
    ("dtype", "dtypes"),
    ("range", r"ids outside \[0, 101\)"),
    ("repeat", "repeated ids"),
    ("positive", "log-probs > 0"),
    ("nan", "not finite"),
])
def test_mismatched_or_malformed_answers_are_refused(mode, message):
    tokens = torch.arange(6).view(2, 3)
    with _StandIn(mode) as server, _stand_in_client(server.address) as client:
        client.prefetch(7, tokens)
        with pytest.raises(TeacherAnswerError, match=message) as err:
            client.get(7, tokens)
        assert "'7'" in str(err.value)
