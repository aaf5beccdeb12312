"""Distillation from a remote top-k teacher, end to end: the service (real Ray) + the entry point.

A tiny HF Qwen2 teacher is served by ``python -m megatron_distill.teacher_service`` (one replica,
top-8); a tiny HF Llama student trains with ``--teacher-remote ADDRESS --kd-topk 8`` at TP=2 on
2 CPU processes (chat rows, requests one iteration ahead). The run must finish, the top-k
forward KL must fall, and with the service stopped the job must fail with an error naming the
address.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests._teacher_service import start_service
from tests.distributed.test_hf_distill_e2e import setup  # noqa: F401  (fixture: HF models, tokenizer, data)
from tests.distributed.test_launcher import _torchrun


@pytest.fixture(scope="module")
def service(setup):  # noqa: F811
    pytest.importorskip("ray", reason='the teacher service needs Ray: pip install "ray>=2.9"')
    _, teacher, _, _, _ = setup
    address, proc, _ = start_service(str(teacher), 8, 1)
    yield address, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _flags(setup, address, metrics):  # noqa: F811
    root, _, student, data, _ = setup
    return ["--load", str(student), "--teacher-remote", address, "--kd-topk", "8", "--train-data", str(data),
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "5",
            "--lr", "1e-2", "--lr-decay-style", "constant", "--tensor-model-parallel-size", "2", "--device", "cpu",
            "--kd-loss", "forward_kl", "--metrics-file", str(metrics), "--teacher-remote-timeout-s", "20"]


def test_distill_from_remote_topk_teacher(setup, service, tmp_path):  # noqa: F811
    address, _ = service
    proc = _torchrun(2, *_flags(setup, address, tmp_path / "m.jsonl"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"remote top-8 teacher at {address}" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[-1]["kd_loss"] < records[0]["kd_loss"]


def test_service_gone_is_an_error_naming_the_address(setup, service, tmp_path):  # noqa: F811
    address, proc = service
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    flags = _flags(setup, address, tmp_path / "m.jsonl")
    flags[flags.index("--teacher-remote-timeout-s") + 1] = "2"
    run = _torchrun(2, *flags, timeout=240)
    assert run.returncode != 0
    assert address in run.stderr + run.stdout
