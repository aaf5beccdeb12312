"""benchmarks/quality/run.py end to end at its tiny scale on the CPU: a run split over two processes
(--work, --merge, --max-segments) continues a method from the segment the first one exported and
keeps every earlier figure; the results carry the run header and the paired comparison. (Accuracy
at the tiny scale means nothing; it is not asserted.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "quality" / "run.py"


def _run(tmp_path: Path, out: str, *flags: str) -> tuple[dict, str]:
    cmd = [sys.executable, str(RUN), "--scale", "tiny", "--methods", "sft", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / out / "results.json").read_text()), proc.stdout


@pytest.mark.timeout(600)
def test_split_run_continues_from_the_last_segment(tmp_path):
    first, _ = _run(tmp_path, "a", "--max-segments", "1")
    assert [p["segment"] for p in first["students"]["sft"]] == [1]
    assert first["benchmark"] == "quality" and first["versions"]["torch"] and first["date"]
    assert (tmp_path / "work" / "warm_kept" / "config.json").exists()

    second, stdout = _run(tmp_path, "b", "--merge", str(tmp_path / "a" / "results.json"))
    assert "continuing after segment 1" in stdout and "reusing" in stdout  # the kept warm start
    points = second["students"]["sft"]
    assert [p["segment"] for p in points] == [1, 2]
    assert points[0] == first["students"]["sft"][0]
    assert points[1]["train_tokens"] > points[0]["train_tokens"]  # counted on from the first run's
    seg2 = [r["cmd"].split() for r in second["engine_runs"] if r["log"].endswith("sft_seg2.log")]
    assert len(seg2) == 1
    assert seg2[0][seg2[0].index("--load") + 1] == str(tmp_path / "work" / "sft_seg1")
    n = second["warm_start"]["n"]
    for p in points:
        change = p["vs_warm_start"]
        assert len(p["per_row"]) == n and 0 <= change["gained"] + change["lost"] <= n
        assert 0.0 <= change["sign_test_p"] <= 1.0
