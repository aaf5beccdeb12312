"""benchmarks/trl_gkd_baseline.py runs TRL's real GKDTrainer end to end on the CPU at its tiny preset
and writes a results file with the header every results file needs and finite figures. (A timing
is never asserted; skipped when trl is not installed.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("trl.experimental.gkd")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "trl_gkd_baseline.py"


@pytest.mark.timeout(120)
def test_trl_gkd_baseline_script(tmp_path):
    out = tmp_path / "trl.json"
    seq, batch, prompt = 32, 2, 8
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--seq-length", str(seq),
           "--batch-size", str(batch), "--steps", "2", "--warmup-steps", "0", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())

    assert record["benchmark"] == "trl_gkd_baseline" and record["device"] == "cpu" and record["world_size"] == 1
    assert record["date"] and "trl_gkd_baseline.py" in record["command"]
    versions = record["versions"]
    for package in ("torch", "python", "transformers", "trl", "accelerate", "datasets"):
        assert versions[package], package

    settings = record["trainer_settings"]
    assert settings["lmbda"] == 0.0 and settings["beta"] == 0.5 and settings["max_length"] == seq
    assert settings["max_new_tokens"] == seq - prompt and settings["gradient_checkpointing"] is False
    assert settings["optim"].startswith("adamw") and settings["max_steps"] == 2

    (result,) = record["results"]
    assert result["global_steps"] == 2 and len(result["timed_step_seconds"]) == 2
    assert math.isfinite(result["tokens_per_sec_per_device"]) and result["tokens_per_sec_per_device"] > 0
    assert result["tokens_per_step_per_device"] == batch * seq
    assert math.isfinite(result["train_loss"]) and result["train_loss"] >= 0
    # lambda = 0: no generation; the loss saw fp32 full-vocabulary logits of the shifted
    # sequences and counted the completion positions only.
    assert result["generations"] == 0
    assert result["logits_shape"] == [batch, seq - 1, 512] and result["student_logits_dtype"] == "torch.float32"
    assert result["loss_positions"] == batch * (seq - prompt)
    assert result["peak_memory_gib"] is None  # CUDA-only figure
