"""One distillation run from a validated ``DistillConfig``: start-up, (teacher pre-training), train.

The entry point (``launch/pretrain_distill.py``) parses flags into a config and calls ``run``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_distill import checkpointing
from megatron_distill.config import ConfigError, DistillConfig, LossConfig, validate
from megatron_distill.data.build import build_data_source, data_source_kind, load_tokenizers
from megatron_distill.engine import build_model, init_model_parallel, kd_loss_output_mode, wrap_stage
from megatron_distill.metrics import MetricsLogger
from megatron_distill.pipeline.stage import DistillStage
from megatron_distill.platform import DeviceContext, init_distributed, resolve_device
from megatron_distill.training import IterationStats, run_iteration

# Stream offset separating the teacher's pre-training data from the distillation data.
_PRETRAIN_STREAM = 10_000_000


def _print0(msg: str, stream=None) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=stream or sys.stdout, flush=True)


def count_parameters(model: torch.nn.Module, pg) -> int:
    """Parameters of the whole model (all TP/PP ranks), counting TP-replicated tensors once."""
    local = 0
    for p in model.parameters():
        local += p.numel() if getattr(p, "tensor_model_parallel", False) else p.numel() / pg.tp.size()
    device = next(model.parameters()).device
    total = torch.tensor([local], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=pg.mp)
    return int(round(total.item()))


def _data(cfg: DistillConfig, pg, world: int, tokenizer=None, stream_offset: int = 0):
    """This DP rank's data source (synthetic, chat files or indexed; see data/build.py)."""
    return build_data_source(cfg, pg.dp.rank(), cfg.data_parallel_size(world), tokenizer,
                             stream_offset=stream_offset)


def _loop(engine, data, iters: int, ctx: DeviceContext, logger: MetricsLogger,
          log_interval: int, start: int = 0, after_iteration=None) -> list[IterationStats]:
    """Iterations ``start + 1 .. iters``; ``after_iteration(it)`` runs after each (checkpoints)."""
    history = []
    for it in range(start + 1, iters + 1):
        stats = run_iteration(engine, data.get(it - 1), it, ctx.device)
        history.append(stats)
        if it % log_interval == 0 or it == iters or it == start + 1:
            logger.log(stats, ctx.device)
        if after_iteration is not None:
            after_iteration(it)
    return history


def pretrain_teacher(cfg: DistillConfig, pg, ctx: DeviceContext, world: int, stream=None, tokenizer=None):
    """Train the teacher with cross-entropy on the data for ``teacher_pretrain_iters`` iterations.

    Returns the teacher's trained state dict for this rank's stage (used by the quickstart so the
    teacher is a distribution worth matching).
    """
    iters = cfg.train.teacher_pretrain_iters
    teacher_as_student = replace(cfg, student=cfg.teacher, loss=LossConfig(kd_weight=0.0, ce_weight=1.0))
    model = build_model(cfg.teacher, teacher_as_student, pg, trainable=True, device=ctx.device)
    engine = wrap_stage(DistillStage(model, None), teacher_as_student, pg,
                        lr=cfg.train.teacher_pretrain_lr, iters=iters)
    logger = MetricsLogger(cfg.train.metrics_file, ctx.rank, iters, phase="teacher-pretrain", stream=stream)
    data = _data(cfg, pg, world, tokenizer, stream_offset=_PRETRAIN_STREAM)
    _print0(f"pre-training the teacher with cross-entropy for {iters} iterations", stream)
    _loop(engine, data, iters, ctx, logger, cfg.train.log_interval)
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def _check_export_target(path: str | None) -> None:
    """Refuse a non-empty --export-hf directory before training, not after it."""
    if path and os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"--export-hf {path}: the directory exists and is not empty; choose a new one")


def _load_hf(model, hf_dir: str, shape, pg, what: str, stream=None) -> None:
    """Copy this rank's shard of a Hugging Face checkpoint into a built stage (before DDP wraps it)."""
    from megatron_distill.arguments import is_hf_dir
    from megatron_distill.models.hf_convert import load_hf_into_stage

    if not is_hf_dir(hf_dir):
        flag = "--load" if what == "student" else "--teacher-load"
        raise ConfigError(f"{flag} {hf_dir}: not a Hugging Face model directory (no config.json there)")
    load_hf_into_stage(model, hf_dir, shape, tp_rank=pg.tp.rank(), tp_size=pg.tp.size(),
                       pp_rank=pg.pp.rank(), pp_size=pg.pp.size())
    _print0(f"{what}: loaded Hugging Face weights from {hf_dir}", stream)


def _build_models(cfg: DistillConfig, pg, ctx: DeviceContext, world: int, stream=None, tokenizer=None):
    """This rank's student and teacher stages.

    With ``--teacher-pretrain-iters`` the teacher is pre-trained first, or, when ``--load``
    holds the teacher that the first run pre-trained (``teacher_pretrained/``), loaded from
    there, so a resumed run distills from the same teacher. With ``--save`` that teacher is
    saved once.
    """
    ckpt, log = cfg.checkpoint, partial(_print0, stream=stream)
    pretrain = cfg.train.teacher_pretrain_iters > 0
    load_teacher = pretrain and checkpointing.has_pretrained_teacher(ckpt.load)
    teacher_state = (
        pretrain_teacher(cfg, pg, ctx, world, stream, tokenizer) if pretrain and not load_teacher else None
    )
    student = build_model(cfg.student, cfg, pg, trainable=True, device=ctx.device)
    teacher = build_model(cfg.teacher, cfg, pg, trainable=False, device=ctx.device)
    if ckpt.student_hf:
        _load_hf(student, ckpt.student_hf, cfg.student, pg, "student", stream)
    if ckpt.teacher_load:
        _load_hf(teacher, ckpt.teacher_load, cfg.teacher, pg, "teacher", stream)
    if teacher_state is not None:
        teacher.load_state_dict(teacher_state)
    elif load_teacher:
        checkpointing.load_pretrained_teacher(teacher, cfg, ckpt.load, log=log)
    if pretrain and ckpt.save and not checkpointing.has_pretrained_teacher(ckpt.save):
        checkpointing.save_pretrained_teacher(teacher, cfg, pg, ckpt.save)
    return student, teacher


def run(cfg: DistillConfig, stream=None) -> list[IterationStats]:
    """Run a whole distillation job in this process (one rank of the job).

    Validates ``cfg`` for this world size before any process group is created, starts the
    device and process groups, optionally pre-trains the teacher, then distills for
    ``train_iters`` iterations. Returns the per-iteration statistics (same on every rank).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    device = resolve_device(cfg.train.device)
    if device == "cpu" and cfg.train.bf16:
        _print0("note: --bf16 on the CPU is slow; it works but fp32 is the usual CPU choice", stream)
    ctx = init_distributed(device, cfg.train.distributed_timeout_minutes)
    pg = init_model_parallel(cfg, cfg.train.seed)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    _print0(
        f"megatron-distill: {world} process(es) on {device} ({ctx.backend}), TP={tp} PP={pp} "
        f"DP={cfg.data_parallel_size(world)}, {cfg.num_microbatches(world)} micro-batch(es) per "
        f"iteration; loss {cfg.loss.kind} (beta={cfg.loss.beta}, temperature={cfg.loss.temperature}) "
        f"x {cfg.loss.kd_weight} + cross-entropy x {cfg.loss.ce_weight}",
        stream,
    )
    try:
        tokenizer = load_tokenizers(cfg)
    except ValueError as err:  # bad tokenizer input: report it like a configuration error
        raise ConfigError(str(err)) from err
    _check_export_target(cfg.checkpoint.export_hf)
    student, teacher = _build_models(cfg, pg, ctx, world, stream, tokenizer)
    _print0(
        f"student: {count_parameters(student, pg):,} parameters; teacher: "
        f"{count_parameters(teacher, pg):,} parameters (frozen)",
        stream,
    )
    output_mode = kd_loss_output_mode(cfg, ctx.device)
    _print0(f"distillation loss: {'fused output layer + loss' if output_mode == 'hidden' else 'reference'}", stream)
    engine = wrap_stage(DistillStage(student, teacher, output_mode=output_mode), cfg, pg)
    logger = MetricsLogger(cfg.train.metrics_file, ctx.rank, cfg.train.train_iters, stream=stream)
    data = _data(cfg, pg, world, tokenizer)
    _print0(f"data: {data_source_kind(cfg)}", stream)
    ckpt, log = cfg.checkpoint, partial(_print0, stream=stream)
    done_iters = 0
    if ckpt.load:  # after building the data: RNG states are restored last
        done_iters = checkpointing.resume_from(engine, ckpt.load, data=data, load_optim=ckpt.load_optim,
                                               load_rng=ckpt.load_rng, log=log)
    saver = checkpointing.periodic_saver(engine, ckpt, data, cfg.train.train_iters, log=log)
    start = time.perf_counter()
    history = _loop(engine, data, cfg.train.train_iters, ctx, logger, cfg.train.log_interval,
                    start=done_iters, after_iteration=saver)
    if history:
        first, last = history[0], history[-1]
        _print0(
            f"done: {len(history)} iterations in {time.perf_counter() - start:.1f}s; kd_loss "
            f"{first.kd_loss:.4f} -> {last.kd_loss:.4f}",
            stream,
        )
    if ckpt.export_hf:
        from megatron_distill.models.hf_convert import export_hf

        export_hf(engine.stage.student, cfg.student, ckpt.export_hf, pg=pg,
                  tokenizer_dir=cfg.data.tokenizer_model, source_config=ckpt.student_hf)
        _print0(f"exported the student as a Hugging Face model to {ckpt.export_hf}", stream)
    return history


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
