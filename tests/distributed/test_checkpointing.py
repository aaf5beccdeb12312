"""Checkpoints through megatron.core.dist_checkpointing: exact resume, resharding, damage, safety.

Real Megatron-Core on gloo, 2 processes, whole runs through ``runner.run`` (flags -> config ->
save/load wiring). Two spawns do all the training:

1. "original" runs of 20 iterations that save on the way: TP2 with dropout 0.1; DP2 with the
   DistributedOptimizer and dropout 0.1 (saving every 5 iterations, ``keep_last`` 3); TP2, and
   DP2 with the DistributedOptimizer, with dropout 0 and a pre-trained teacher (saved once
   under ``teacher_pretrained/``).
2. in new processes, runs that load the iteration-10 checkpoints and train 10 more: the same
   layouts (losses of iterations 11-20 must be bitwise equal: the RNG, the Adam state, the LR
   schedule position and the data position are all restored); TP2 -> PP2, TP2 -> TP1 x DP2 and
   (DistributedOptimizer) DP2 -> TP2 (a resharded load of model and optimizer; the teacher comes
   from ``teacher_pretrained/``); refusals (truncated checkpoint, different student shape); a
   save that fails half-way.

Tolerance for a different layout: float32 everywhere, dropout 0 (the RNG streams of different
layouts differ, so they are not restored). A different layout only reorders float32 sums (TP
splits the matmul reductions, PP and DP do not change them here, micro-batching splits the
token sums), as in test_engine_equivalence.py; ten Adam steps from the same state keep the
losses within 1e-5 relative (observed ~1e-7), while a wrongly resharded tensor or a lost
optimizer state changes them at 1e-3 or more.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_distill import checkpoint_files as files
from megatron_distill.checkpoint_io import SafeCommonLoad, read_dcp_metadata
from megatron_distill.checkpointing import CheckpointError, check_config
from megatron_distill.config import CheckpointConfig, DistillConfig
from tests._dist_utils import run_distributed
from tests.distributed.engine_cases import make_config

RTOL = 1e-5
ITERS = 20


def _config(tp: int, pp: int, *, dropout: float, distributed_optimizer: bool = False, pretrain: int = 0,
            **checkpoint) -> DistillConfig:
    """engine_cases' config (GQA/SwiGLU/RoPE student, wider LayerNorm teacher), 20 iterations,
    a warm-up + cosine LR schedule (so the schedule position matters), student dropout."""
    cfg = make_config(tp, pp, train_iters=ITERS, distributed_optimizer=distributed_optimizer)
    return dataclasses.replace(
        cfg,
        student=dataclasses.replace(cfg.student, hidden_dropout=dropout, attention_dropout=dropout),
        train=dataclasses.replace(cfg.train, lr_decay_style="cosine", lr_warmup_iters=4, min_lr=1e-3,
                                  teacher_pretrain_iters=pretrain, teacher_pretrain_lr=1e-2),
        checkpoint=CheckpointConfig(**checkpoint),
    )


def _phase(cfg: DistillConfig) -> dict:
    """One ``runner.run`` in this (already started) process; the parallel state is torn down after."""
    from megatron.core import parallel_state

    from megatron_distill import runner

    out = io.StringIO()
    try:
        history = runner.run(cfg, stream=out)
        return {"iterations": [s.iteration for s in history], "losses": [s.loss for s in history],
                "grad_norms": [s.grad_norm for s in history], "lrs": [s.lr for s in history],
                "log": out.getvalue()}
    except CheckpointError as exc:
        return {"error": str(exc), "log": out.getvalue()}
    finally:
        parallel_state.destroy_model_parallel()


def original_runs_worker(root: str) -> dict:
    """Spawn 1: the uninterrupted runs, saving on the way."""
    from megatron_distill import checkpoint_files
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    prunes = []
    real_prune = checkpoint_files.prune

    def recording_prune(save_root, keep_last, newest):
        # What exists when old checkpoints are deleted: the new one must already be complete.
        new = checkpoint_files.iteration_dir(save_root, newest)
        prunes.append({"newest": newest, "newest_intact": not checkpoint_files.verify_checkpoint(new),
                       "before": [i for i, _ in checkpoint_files.list_checkpoints(save_root)]})
        return real_prune(save_root, keep_last, newest)

    checkpoint_files.prune = recording_prune
    return {
        "tp2": _phase(_config(2, 1, dropout=0.1, save=f"{root}/tp2", save_interval=10)),
        "dp2": _phase(_config(1, 1, dropout=0.1, distributed_optimizer=True, save=f"{root}/dp2",
                              save_interval=5, keep_last=3)),
        "tp2_nodrop": _phase(_config(2, 1, dropout=0.0, pretrain=3, save=f"{root}/tp2_nodrop", save_interval=10)),
        "dp2_nodrop": _phase(_config(1, 1, dropout=0.0, distributed_optimizer=True, pretrain=3,
                                     save=f"{root}/dp2_nodrop", save_interval=10)),
        "prunes": prunes,
    }


def resumed_runs_worker(root: str) -> dict:
    """Spawn 2: new processes that load the iteration-10 checkpoints (copied to ``root/load_*``)."""
    from megatron_distill import checkpoint_files
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    results = {
        "tp2": _phase(_config(2, 1, dropout=0.1, load=f"{root}/load_tp2")),
        "dp2": _phase(_config(1, 1, dropout=0.1, distributed_optimizer=True, load=f"{root}/load_dp2")),
        "pp2": _phase(_config(1, 2, dropout=0.0, pretrain=3, load=f"{root}/load_nodrop")),
        "tp1": _phase(_config(1, 1, dropout=0.0, pretrain=3, load=f"{root}/load_nodrop")),
        "distopt_tp2": _phase(_config(2, 1, dropout=0.0, distributed_optimizer=True, pretrain=3,
                                      load=f"{root}/load_dp2_nodrop")),
        "truncated": _phase(_config(2, 1, dropout=0.1, load=f"{root}/truncated")),
    }
    wider = _config(2, 1, dropout=0.1, load=f"{root}/load_tp2")
    wider = dataclasses.replace(wider, student=dataclasses.replace(wider.student, hidden_size=48))
    results["mismatch"] = _phase(wider)

    real_marker = checkpoint_files.write_complete_marker

    def failing_marker(path, info):
        if info.get("iteration") == ITERS:
            raise OSError("disk full (injected)")
        return real_marker(path, info)

    checkpoint_files.write_complete_marker = failing_marker
    crash = f"{root}/crash"
    results["crash"] = _phase(_config(2, 1, dropout=0.1, load=crash, save=crash, save_interval=5, keep_last=1))
    return results


def _copy_iteration(src: Path, iteration: int, dst: Path, with_teacher: bool = False) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(files.iteration_dir(src, iteration), files.iteration_dir(dst, iteration))
    if with_teacher:
        shutil.copytree(src / files.TEACHER_DIR, dst / files.TEACHER_DIR)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    original = run_distributed(original_runs_worker, 2, str(root), init_process_group=False, timeout=300)
    for res in original:
        for name in ("tp2", "dp2", "tp2_nodrop", "dp2_nodrop"):
            assert "error" not in res[name], res[name]
    _copy_iteration(root / "tp2", 10, root / "load_tp2")
    _copy_iteration(root / "dp2", 10, root / "load_dp2")
    _copy_iteration(root / "tp2_nodrop", 10, root / "load_nodrop", with_teacher=True)
    _copy_iteration(root / "dp2_nodrop", 10, root / "load_dp2_nodrop", with_teacher=True)
    _copy_iteration(root / "tp2", 10, root / "crash")
    truncated = _copy_iteration(root / "tp2", 20, root / "truncated")
    shutil.copytree(files.iteration_dir(root / "tp2", 10), files.iteration_dir(truncated, 10))
    distcp = sorted(files.iteration_dir(truncated, 20).glob("*.distcp"))[0]
    with open(distcp, "r+b") as f:
        f.truncate(distcp.stat().st_size // 2)
    resumed = run_distributed(resumed_runs_worker, 2, str(root), init_process_group=False, timeout=300)
    return {"root": root, "original": original, "resumed": resumed, "truncated_file": distcp.name}


def _tail(result: dict) -> list[float]:
    assert result["iterations"][-10:] == list(range(11, ITERS + 1))
    return result["losses"][-10:]


@pytest.mark.parametrize("name", ["tp2", "dp2"], ids=["tp2-dropout", "dp2-distributed-optimizer-dropout"])
def test_resume_is_bitwise_exact(runs, name):
    for original, resumed in zip(runs["original"], runs["resumed"], strict=True):
        ref, res = original[name], resumed[name]
        assert "error" not in res, res
        assert res["iterations"] == list(range(11, ITERS + 1)), "did not continue from iteration 10"
        assert "loaded checkpoint" in runs["resumed"][0][name]["log"]
        assert res["losses"] == ref["losses"][10:], "losses after resume differ"
        assert res["grad_norms"] == ref["grad_norms"][10:]
        assert res["lrs"] == ref["lrs"][10:]
    losses = runs["original"][0][name]["losses"]
    assert len(set(losses)) == ITERS and losses[-1] < losses[0], "runs too trivial to show anything"


@pytest.mark.parametrize(
    "name,original",
    [("pp2", "tp2_nodrop"), ("tp1", "tp2_nodrop"), ("distopt_tp2", "dp2_nodrop")],
    ids=["tp2-to-pp2", "tp2-to-tp1xdp2", "distributed-optimizer-dp2-to-tp2"],
)
def test_resume_into_another_layout(runs, name, original):
    ref = runs["original"][0][original]
    for resumed in runs["resumed"]:
        res = resumed[name]
        assert "error" not in res, res
        torch.testing.assert_close(res["losses"], _tail(ref), rtol=RTOL, atol=0)
        torch.testing.assert_close(res["grad_norms"], ref["grad_norms"][10:], rtol=RTOL, atol=0)
    log = runs["resumed"][0][name]["log"]
    assert "loaded the pre-trained teacher" in log and "pre-training the teacher" not in log
    assert "RNG states not restored" in log


def test_teacher_is_not_in_the_checkpoint(runs):
    path = files.iteration_dir(runs["root"] / "tp2", 10)
    keys = set(read_dcp_metadata(path).state_dict_metadata)
    model_keys = {k for k in keys if not k.startswith("optimizer.")}
    assert model_keys and all(k.startswith(("embedding.", "decoder.")) for k in model_keys), model_keys
    assert not any("teacher" in k for k in keys)
    meta = read_dcp_metadata(path).state_dict_metadata
    assert tuple(meta["embedding.word_embeddings.weight"].size) == (98, 32)  # student width, padded vocab
    assert tuple(meta["decoder.layers.self_attention.linear_proj.weight"].size)[0] == 4  # student layers
    teacher = read_dcp_metadata(runs["root"] / "tp2_nodrop" / files.TEACHER_DIR).state_dict_metadata
    assert tuple(teacher["embedding.word_embeddings.weight"].size) == (98, 48)


def test_checkpoint_directory_layout(runs):
    root = runs["root"] / "tp2"
    assert [i for i, _ in files.list_checkpoints(root)] == [10, 20]
    assert (root / files.POINTER).read_text().strip() == "20"
    marker = files.read_marker(files.iteration_dir(root, 10))
    assert marker["iteration"] == 10 and {"rng/pp00_tp00_dp000.pt", "rng/pp00_tp01_dp000.pt"} <= set(marker["files"])
    common = SafeCommonLoad().load_common(files.iteration_dir(root, 10))
    data_state = common["distill"]["data_state"]  # the source's state_dict(), else {"iteration": N}
    assert common["iteration"] == 10 and data_state.get("iteration", 10) == 10 and data_state.get("seed", 4321) == 4321
    assert common["distill"]["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert not list(root.glob("*.tmp-*")), "temporary directories left behind"


def test_keep_last_deletes_only_after_the_new_checkpoint_is_complete(runs):
    root = runs["root"] / "dp2"
    assert [i for i, _ in files.list_checkpoints(root)] == [10, 15, 20]
    prunes = runs["original"][0]["prunes"]
    assert [p["newest"] for p in prunes] == [5, 10, 15, 20]
    assert all(p["newest_intact"] and p["newest"] in p["before"] for p in prunes)
    assert prunes[-1]["before"] == [5, 10, 15, 20]


def test_truncated_checkpoint_is_refused_and_the_previous_one_found(runs):
    """--load refuses the damaged newest checkpoint, naming it and the file, and resumes from the previous."""
    root = runs["root"] / "truncated"
    for resumed in runs["resumed"]:
        assert "error" not in resumed["truncated"], resumed["truncated"].get("error")
        assert resumed["truncated"]["iterations"][0] == 11
    log = runs["resumed"][0]["truncated"]["log"]  # rank 0 prints
    assert str(files.iteration_dir(root, 20)) in log and runs["truncated_file"] in log
    assert "truncated" in log and "newest intact checkpoint is iteration 10" in log
    problems = files.verify_checkpoint(files.iteration_dir(root, 20))
    assert len(problems) == 1 and runs["truncated_file"] in problems[0]
    assert files.find_latest_complete(root) == 10


def test_tmp_and_unmarked_directories_are_ignored(runs, tmp_path):
    root = _copy_iteration(runs["root"] / "tp2", 10, tmp_path / "ckpts")
    shutil.copytree(files.iteration_dir(root, 10), root / "iter_0000030.tmp-1234abcd")
    unmarked = files.iteration_dir(root, 40)
    shutil.copytree(files.iteration_dir(root, 10), unmarked)
    (unmarked / files.COMPLETE).unlink()
    assert [i for i, _ in files.list_checkpoints(root)] == [10, 40]
    assert "no COMPLETE marker" in files.verify_checkpoint(unmarked)[0]
    assert files.find_latest_complete(root) == 10
    assert files.find_latest_complete(tmp_path / "nothing-here") is None


def test_failed_save_leaves_the_previous_checkpoints(runs):
    root = runs["root"] / "crash"
    for resumed in runs["resumed"]:
        assert "disk full (injected)" in resumed["crash"]["error"]
    # keep_last 1: iteration 10 was deleted once 15 was complete; 20 failed before its marker.
    assert [i for i, _ in files.list_checkpoints(root)] == [15]
    assert files.find_latest_complete(root) == 15
    assert (root / files.POINTER).read_text().strip() == "15"
    assert len(list(root.glob("iter_0000020.tmp-*"))) == 1


def test_student_shape_mismatch_names_the_field(runs):
    for resumed in runs["resumed"]:
        error = resumed["mismatch"]["error"]
        assert "student.hidden_size (--hidden-size): checkpoint 32, this run 48" in error
        assert "load_tp2/iter_0000010" in error


def test_config_check_allows_a_new_layout_and_refuses_an_optimizer_switch(runs):
    saved = SafeCommonLoad().load_common(files.iteration_dir(runs["root"] / "tp2", 10))["distill"]["config"]
    other_layout = _config(1, 2, dropout=0.1, load="x")
    notes = check_config(saved, other_layout, Path("ckpt"), loading_optimizer=True)
    assert "parallel.pipeline_model_parallel_size: 1 -> 2" in notes
    distopt = _config(2, 1, dropout=0.1, distributed_optimizer=True, load="x")
    with pytest.raises(CheckpointError, match="(?s)--no-load-optim.*use_distributed_optimizer"):
        check_config(saved, distopt, Path("ckpt"), loading_optimizer=True)
    assert check_config(saved, distopt, Path("ckpt"), loading_optimizer=False)
    lean = dataclasses.replace(other_layout, train=dataclasses.replace(
        other_layout.train, bf16=saved["train"]["bf16"], use_precision_aware_optimizer=True))
    with pytest.raises(CheckpointError, match="(?s)--no-load-optim.*--use-precision-aware-optimizer"):
        check_config(saved, lean, Path("ckpt"), loading_optimizer=True)
    # A checkpoint written before a training setting existed reads as having its default.
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "use_precision_aware_optimizer"}}
    check_config(older, other_layout, Path("ckpt"), loading_optimizer=True)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        read_dcp_metadata(tmp_path)
    torch.save({"x": _Boom()}, tmp_path / "common.pt")
    with pytest.raises(pickle.UnpicklingError):
        SafeCommonLoad().load_common(tmp_path)


def test_marker_lists_sizes(tmp_path):
    ckpt = tmp_path / "iter_0000001.tmp-x"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "a.bin").write_bytes(b"1234")
    (ckpt / "sub" / "b.pt").write_bytes(b"12")
    files.write_complete_marker(ckpt, {"kind": "iteration", "iteration": 1})
    files.commit(ckpt, files.iteration_dir(tmp_path, 1))
    marker = json.loads((files.iteration_dir(tmp_path, 1) / files.COMPLETE).read_text())
    assert marker["files"] == {"a.bin": 4, "sub/b.pt": 2}
    assert files.find_latest_complete(tmp_path) == 1
