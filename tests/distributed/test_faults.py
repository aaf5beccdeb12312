"""Faults on the CPU with real processes (gloo): preemption, kill -9, NaN steps, damaged checkpoints, hangs.

Each case runs the entry point under torchrun (2 processes, PP=2, tiny synthetic run, dropout on
so RNG state matters) with faults planted through ``MEGATRON_DISTILL_INJECT_FAULT``
(resilience.FaultInjector) or a real ``kill -9``, and compares the metrics (loss, grad norm,
learning rate per iteration, exact float equality on the CPU) with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._dist_utils import free_port

REPO = Path(__file__).resolve().parents[2]
BASE = ["--config-file", "configs/quickstart.yaml", "--device", "cpu", "--teacher-pretrain-iters", "0",
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", "--hidden-dropout", "0.1",
        "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "32", "--log-interval", "1",
        "--lr-warmup-iters", "2"]
EXIT_PREEMPTED, EXIT_TOO_MANY_SKIPS, EXIT_COLLECTIVE_TIMEOUT = 75, 76, 77


def _cmd(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
            str(REPO / "launch" / "pretrain_distill.py"), *BASE, *flags]


def _env(fault: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MEGATRON_DISTILL_INJECT_FAULT", None)
    if fault:
        env["MEGATRON_DISTILL_INJECT_FAULT"] = fault
    return env


def _run(*flags: str, fault: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*flags), cwd=REPO, env=_env(fault), capture_output=True, text=True, timeout=timeout)


def _metrics(path: Path) -> dict[int, tuple]:
    """iteration -> (loss, grad_norm, lr, skipped) of the distillation phase (last record wins)."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["phase"] == "distill":
            out[r["iteration"]] = (r["loss"], r["grad_norm"], r["lr"], r["skipped"])
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    proc = _run("--train-iters", "8", "--metrics-file", str(root / "m.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(root / "m.jsonl")


def test_sigterm_saves_checkpoint_and_resume_is_exact(tmp_path, uninterrupted):
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    first = _run("--train-iters", "8", "--save", str(save), "--metrics-file", str(metrics), fault="sigterm:4:1")
    assert first.returncode != 0
    assert "received SIGTERM" in first.stderr + first.stdout
    assert "stopping (preemption): saved checkpoint" in first.stdout
    assert (save / "iter_0000004" / "COMPLETE").is_file()
    assert f"exitcode  : {EXIT_PREEMPTED}" in first.stderr
    second = _run("--train-iters", "8", "--save", str(save), "--auto-resume", "--metrics-file", str(metrics))
    assert second.returncode == 0, second.stderr[-3000:]
    got = _metrics(metrics)
    assert {i: got[i] for i in range(1, 9)} == uninterrupted


def test_kill_9_one_rank_then_auto_resume_matches(tmp_path, uninterrupted):
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    flags = ["--train-iters", "8", "--save", str(save), "--save-interval", "3", "--metrics-file", str(metrics)]
    proc = subprocess.Popen(_cmd(*flags), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (save / "iter_0000003" / "COMPLETE").is_file():
        time.sleep(0.2)
    assert (save / "iter_0000003" / "COMPLETE").is_file(), "no checkpoint before the kill"
    children = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "pretrain_distill.py"], capture_output=True,
                              text=True).stdout.split()
    assert children, "no rank processes found"
    os.kill(int(children[-1]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    resumed = _run("--train-iters", "8", "--save", str(save), "--auto-resume", "--metrics-file", str(metrics))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _metrics(metrics)
    assert {i: got[i] for i in range(1, 9)} == uninterrupted


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, uninterrupted):
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    first = _run("--train-iters", "6", "--save", str(save), "--save-interval", "3", "--metrics-file", str(metrics))
    assert first.returncode == 0, first.stderr[-3000:]
    shard = sorted((save / "iter_0000006").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = _run("--train-iters", "8", "--save", str(save), "--auto-resume", "--metrics-file", str(metrics))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "refusing checkpoint" in resumed.stdout and "iter_0000006" in resumed.stdout
    assert "truncated" in resumed.stdout and "resuming from iteration 3" in resumed.stdout
    got = _metrics(metrics)
    assert {i: got[i] for i in range(1, 9)} == uninterrupted


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    proc = _run("--train-iters", "8", "--save", str(save), "--max-skipped-steps", "2", "--metrics-file",
                str(metrics), fault="nan:3:1:1,nan:4:1:0")
    assert proc.returncode != 0
    assert "iteration 3: step skipped on every rank: non-finite loss or gradient (micro-batch(es) [1])" in proc.stdout
    assert "2 consecutive iterations skipped (--max-skipped-steps 2)" in proc.stdout
    assert (save / "iter_0000004" / "COMPLETE").is_file()
    assert f"exitcode  : {EXIT_TOO_MANY_SKIPS}" in proc.stderr
    got = _metrics(metrics)
    assert got[3][3] and got[4][3] and not got[2][3]
    # The LR reported at an iteration is the one it used: warm-up moves it after a good step (2 -> 3)
    # and a skipped step leaves the schedule where it was (3 -> 4).
    assert got[3][2] != got[2][2] and got[4][2] == got[3][2]


def test_teacher_nonfinite_is_reported_as_the_teachers_fault(tmp_path):
    proc = _run("--train-iters", "3", fault="nan-teacher:2:1:0", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iteration 2: step skipped on every rank: the teacher produced non-finite outputs" in proc.stdout


def test_hung_rank_ends_the_job_with_a_named_error(tmp_path):
    proc = _run("--train-iters", "5", "--distributed-timeout-minutes", "0.15", fault="hang:3:1", timeout=180)
    assert proc.returncode != 0
    assert "rank 0 (pipeline stage 0, tensor-parallel rank 0)" in proc.stderr
    assert "did not finish within --distributed-timeout-minutes" in proc.stderr


def _nan_worker(weights_path: str, batch_indices: list[int], fault: str) -> dict:
    """PP=2 engine run over the given synthetic batches, with a planted fault; final student params."""
    import torch

    from megatron_distill.data.synthetic import MarkovSource, SyntheticBatches
    from megatron_distill.engine import build_model, init_model_parallel, wrap_stage
    from megatron_distill.models.sharding import load_full_state_dict
    from megatron_distill.pipeline.stage import DistillStage
    from megatron_distill.platform import init_distributed
    from megatron_distill.resilience import FaultInjector
    from megatron_distill.training import run_iteration
    from tests.distributed.engine_cases import STUDENT, TEACHER, VOCAB, make_config

    init_distributed("cpu")
    cfg = make_config(1, 2)
    pg = init_model_parallel(cfg, seed=1)
    full = torch.load(weights_path, weights_only=True)
    models = {}
    for key, shape, trainable in (("student", STUDENT, True), ("teacher", TEACHER, False)):
        models[key] = build_model(shape, cfg, pg, trainable=trainable)
        load_full_state_dict(models[key], {k: v for k, v in full[key].items() if not k.endswith("_extra_state")},
                             num_layers=shape.num_layers, pp_rank=pg.pp.rank(), pp_size=2, tp_rank=0, tp_size=1,
                             gated_mlp=shape.swiglu)
    engine = wrap_stage(DistillStage(models["student"], models["teacher"]), cfg, pg)
    data = SyntheticBatches(MarkovSource(VOCAB, 4, seed=3), 16, 8, 2, 0, 1)
    faults = FaultInjector(fault)
    losses, skipped = [], []
    for it, index in enumerate(batch_indices, start=1):
        stats = run_iteration(engine, faults.corrupt_batches(it, data.get(index)), it, torch.device("cpu"))
        losses.append(stats.loss)
        skipped.append(stats.skipped)
    params = {k: v.detach().clone() for k, v in models["student"].named_parameters()}
    return {"losses": losses, "skipped": skipped, "params": params}


def test_nan_in_one_microbatch_on_one_rank_skips_everywhere_and_changes_nothing(tmp_path):
    import math

    import torch

    from tests._dist_utils import run_distributed
    from tests.distributed.engine_cases import save_full_weights_worker

    weights = str(tmp_path / "full.pt")
    run_distributed(save_full_weights_worker, 1, weights, init_process_group=False, timeout=120)
    faulty = run_distributed(_nan_worker, 2, weights, [0, 1, 2, 3], "nan:2:1:1", init_process_group=False,
                             timeout=240)
    without = run_distributed(_nan_worker, 2, weights, [0, 2, 3], "", init_process_group=False, timeout=240)
    for rank in range(2):
        assert faulty[rank]["skipped"] == [False, True, False, False]  # every rank skipped iteration 2
        assert math.isnan(faulty[rank]["losses"][1])
        assert faulty[rank]["losses"][2:] == without[rank]["losses"][1:]
        for name, value in faulty[rank]["params"].items():
            assert torch.equal(value, without[rank]["params"][name]), name
