"""Start ``python -m megatron_distill.teacher_service`` as a subprocess for tests and wait until it listens."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def start_service(teacher_dir: str, topk: int, replicas: int, env: dict | None = None,
                  timeout: float = 150.0) -> tuple[str, subprocess.Popen, list[str]]:
    """(address, process, output lines so far); fails the test when the service does not start."""
    cmd = [sys.executable, "-m", "megatron_distill.teacher_service", "--teacher-load", str(teacher_dir),
           "--topk", str(topk), "--replicas", str(replicas), "--port", "0", "--cpus-per-replica", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    found = threading.Event()

    def drain():
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the teacher service did not start:\n" + "".join(lines[-40:]))
    return re.search(r"listening on (http://\S+)", "".join(lines)).group(1), proc, lines
