"""The entry point end to end: ``torchrun launch/pretrain_distill.py`` with the quickstart recipe.

A shortened quickstart (TP=2 x PP=2, 4 CPU processes, gloo) must pre-train the teacher,
distill, write one JSON object per logged iteration with the documented fields, and its
kd_loss must fall clearly. A bad configuration must stop before any process group is created,
with exit code 2 and a message naming the flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._dist_utils import free_port

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"iteration", "loss", "kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_sec", "num_tokens",
          "phase", "seconds"}


def _torchrun(nproc: int, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(REPO / "launch" / "pretrain_distill.py"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_quickstart_short_run_learns_and_writes_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    proc = _torchrun(
        4, "--config-file", "configs/quickstart.yaml", "--device", "cpu", "--train-iters", "40",
        "--teacher-pretrain-iters", "60", "--log-interval", "10", "--metrics-file", str(metrics),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[distill] iter    40/40" in proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    distill = [r for r in records if r["phase"] == "distill"]
    pretrain = [r for r in records if r["phase"] == "teacher-pretrain"]
    assert [r["iteration"] for r in distill] == [1, 10, 20, 30, 40]
    assert [r["iteration"] for r in pretrain] == [1, 10, 20, 30, 40, 50, 60]
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["num_tokens"] == 16 * 64  # global batch x sequence, every token counted
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
    assert pretrain[-1]["ce_loss"] < 0.5 * pretrain[0]["ce_loss"], "teacher did not learn the source"
    assert distill[-1]["kd_loss"] < 0.5 * distill[0]["kd_loss"], "kd_loss did not fall clearly"


def test_bad_config_names_the_flag_and_exits_2():
    proc = _torchrun(
        4, "--config-file", "configs/quickstart.yaml", "--device", "cpu", "--num-attention-heads", "3",
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--num-attention-heads (3) must be divisible by --tensor-model-parallel-size (2)" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr


def test_world_size_not_multiple_of_tp_pp():
    proc = _torchrun(3, "--config-file", "configs/quickstart.yaml", "--device", "cpu", timeout=120)
    assert proc.returncode != 0
    assert "world size (3 processes) must be a multiple of" in proc.stderr
