"""The GPU benchmark scripts run end to end on the CPU at their tiny preset and write a results file
with the header every results file needs (device, date, versions, command) and finite figures.
(The figures themselves mean nothing on the CPU; a timing is never asserted.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._dist_utils import free_port

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
           str(REPO / "benchmarks" / script), "--preset", "tiny", "--device", "cpu", "--out", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == script.removesuffix(".py") and record["device"] == "cpu"
    assert record["versions"]["torch"] and record["versions"]["megatron_core"] and record["date"]
    assert record["command"].startswith(f"{REPO / 'benchmarks' / script}") or script in record["command"]
    return record


@pytest.mark.timeout(300)
def test_e2e_script(tmp_path):
    record = _run("e2e.py", tmp_path / "e2e.json", "--seq-length", "64", "--global-batch-size", "2",
                  "--iters", "1", "--warmup", "1", "--recompute-modules", "layernorm", "swiglu")
    assert [r["mode"] for r in record["results"]] == ["distill", "student_ce", "teacher_fwd"]
    assert record["recompute_modules"] == ["layernorm", "swiglu"]
    for r in record["results"]:
        assert "error" not in r, r
        assert math.isfinite(r["tokens_per_sec_per_gpu"]) and r["tokens_per_sec_per_gpu"] > 0
        assert r["held_memory_gib_max_over_ranks"] is None  # CPU: no CUDA memory counters


@pytest.mark.timeout(300)
def test_rollout_script(tmp_path):
    record = _run("rollout.py", tmp_path / "rollout.json", "--batch", "4", "--prompt-length", "8",
                  "--max-new-tokens", "8", "--iters", "1", "--warmup", "0", "--gkd-iters", "1", "--gkd-warmup", "0",
                  "--micro-batch-size", "2")
    (gen,) = record["results"]["generate"]
    assert gen["generated_tokens_per_sec_total"] > 0
    gkd = record["results"]["gkd"]
    assert gkd["iteration_seconds_median"] >= gkd["rollout_seconds_median"] > 0
