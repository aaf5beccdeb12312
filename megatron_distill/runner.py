"""One distillation run from a validated ``DistillConfig``: start-up, (teacher pre-training), train.

The entry point (``launch/pretrain_distill.py``) parses flags into a config and calls ``run``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
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
from megatron_distill.remote_teacher import RemoteTeacherFeed
from megatron_distill.resilience import EXIT_PREEMPTED, EXIT_TOO_MANY_SKIPS, FaultInjector, PreemptionHandler
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


class TooManySkippedSteps(RuntimeError):
    """``--max-skipped-steps`` consecutive iterations had a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """A rank received SIGTERM / SIGUSR1; every rank stopped after iteration ``iteration``."""

    def __init__(self, iteration: int):
        super().__init__(f"preempted after iteration {iteration}")
        self.iteration = iteration


def _loop(engine, data, iters: int, ctx: DeviceContext, logger: MetricsLogger,
          log_interval: int, start: int = 0, after_iteration=None, guard: RunGuard | None = None,
          ) -> list[IterationStats]:
    """Iterations ``start + 1 .. iters``; ``after_iteration(it)`` runs after each (checkpoints).

    With a ``guard``: planted test faults are delivered, skipped steps are reported and counted
    (``TooManySkippedSteps`` after too many in a row) and a preemption signal on any rank stops
    every rank after the current iteration (``Preempted``).
    """
    history = []
    feed = guard.feed if guard is not None else None
    # With a remote teacher the next iteration's batches are read one iteration early, so that
    # their requests are in flight while this iteration trains.
    upcoming = data.get(start) if feed is not None and start < iters else None
    if upcoming is not None:
        feed.prefetch(start + 1, upcoming)
    for it in range(start + 1, iters + 1):
        if feed is None:
            batches = data.get(it - 1)
        else:
            batches, upcoming = upcoming, (data.get(it) if it < iters else None)
            if upcoming is not None:
                feed.prefetch(it + 1, upcoming)
            batches = feed.attach(it, batches)
        if guard is not None:
            guard.faults.before_iteration(it)
            batches = guard.faults.corrupt_batches(it, batches)
        stats = run_iteration(engine, batches, it, ctx.device)
        if hasattr(data, "add_metrics"):  # on-policy rollouts (onpolicy.py): rollout time, lengths, rewards
            data.add_metrics(stats)
        history.append(stats)
        if it % log_interval == 0 or it == iters or it == start + 1 or stats.skipped:
            logger.log(stats, ctx.device)
        if guard is not None:
            guard.after_step(stats)
        if after_iteration is not None:
            after_iteration(it)
        if guard is not None and guard.preemption.should_stop(ctx.device):
            raise Preempted(it)
    return history


@dataclass
class RunGuard:
    """Preemption flag, planted faults and the consecutive-skip counter of one run."""

    preemption: PreemptionHandler
    faults: FaultInjector
    max_skipped_steps: int
    stream: object = None
    feed: RemoteTeacherFeed | None = None
    consecutive_skips: int = 0

    last_iteration: int = 0

    def after_step(self, stats: IterationStats) -> None:
        self.last_iteration = stats.iteration
        if not stats.skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        reason = stats.extra.get("skip_reason", "the optimizer reported an overflow")
        micro = stats.extra.get("nonfinite_microbatches", [])
        _print0(f"warning: iteration {stats.iteration}: step skipped on every rank: {reason} "
                f"(micro-batch(es) {micro or 'n/a'}); {self.consecutive_skips} in a row", self.stream)
        if self.consecutive_skips >= self.max_skipped_steps:
            raise TooManySkippedSteps(
                f"{self.consecutive_skips} consecutive iterations skipped (--max-skipped-steps "
                f"{self.max_skipped_steps}), the last at iteration {stats.iteration}: {reason}"
            )


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


def _self_teacher(cfg: DistillConfig, student, pg, ctx: DeviceContext, stream=None):
    """Privileged-context self-distillation: the teacher is the student (module docstring of data/privileged.py).

    ``self-live``: no teacher module (DistillStage runs the student twice). ``self-frozen``: a
    frozen copy of the initial student (after ``--load`` of an HF dir), saved once under
    ``--save`` and loaded from there on resume, so a resumed run keeps the same teacher.
    """
    ckpt, log = cfg.checkpoint, partial(_print0, stream=stream)
    if ckpt.student_hf:
        _load_hf(student, ckpt.student_hf, cfg.student, pg, "student", stream)
    who = ("the current student weights, without grad" if ckpt.teacher_mode == "self-live"
           else "a frozen copy of the initial student")
    log(f"self-distillation: teacher = {who}; "
        f"it sees the privileged context, the student does not; loss {cfg.loss.kind} at temperature "
        f"{cfg.loss.temperature} (this mode's default: forward_kl at 1.0)")
    if ckpt.teacher_mode == "self-live":
        return None
    teacher = build_model(cfg.student, cfg, pg, trainable=False, device=ctx.device)
    if checkpointing.has_pretrained_teacher(ckpt.load):
        checkpointing.load_pretrained_teacher(teacher, cfg, ckpt.load, log=log)
    else:
        teacher.load_state_dict(student.state_dict())
        if ckpt.save and not checkpointing.has_pretrained_teacher(ckpt.save):
            checkpointing.save_pretrained_teacher(teacher, cfg, pg, ckpt.save)
    return teacher


def _remote_feed(cfg: DistillConfig, pg, ctx: DeviceContext) -> RemoteTeacherFeed | None:
    """The remote top-k teacher's feed (``--teacher-remote``), or None for a local teacher."""
    if not cfg.checkpoint.teacher_remote:
        return None
    return RemoteTeacherFeed(
        cfg.checkpoint.teacher_remote, cfg.loss.topk, cfg.student.vocab_size, cfg.loss.temperature, pg, ctx.device,
        token=os.environ.get("MEGATRON_DISTILL_TEACHER_TOKEN"), timeout_s=cfg.checkpoint.teacher_remote_timeout_s,
    )


def _on_policy(data, engine, tokenizer, cfg: DistillConfig, ctx: DeviceContext, stream=None):
    """Wrap the chat source so each iteration's responses are generated in place (onpolicy.py)."""
    from megatron_distill.onpolicy import OnPolicyData

    ro = cfg.rollout
    try:
        wrapped = OnPolicyData(data, engine, tokenizer, ro, device=ctx.device)
    except (ImportError, AttributeError, TypeError, ValueError) as err:  # a bad --reward-fn
        raise ConfigError(f"--reward-fn: {err}") from err
    sampling = "greedy" if ro.temperature == 0 else (
        f"temperature {ro.temperature}, top-p {ro.top_p}, top-k {ro.top_k}, seed {ro.seed}")
    rl = f"; RL term x {ro.rl_loss_weight}, reward {ro.reward_fn}" if ro.rl_loss_weight > 0 else ""
    _print0(f"on-policy: fraction {ro.on_policy_fraction} student rollouts"
            f"{', the rest teacher-generated (--seq-kd)' if ro.seq_kd else ''}, {ro.rollouts_per_prompt} per prompt, "
            f"up to {ro.max_new_tokens} new tokens, {sampling}, stop ids {list(wrapped.stop_ids)}{rl}", stream)
    if ro.backend == "sglang":
        _print0(f"rollout backend: sglang server at {ro.sglang_url} (student rollouts; weights exported to "
                f"{ro.sglang_weights_dir} and reloaded every {ro.sglang_sync_interval} iteration(s)"
                f"{'; teacher rollouts in place' if ro.seq_kd else ''})", stream)
    else:
        _print0("rollout backend: megatron (in place, training layout)", stream)
    return wrapped


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
    if ckpt.teacher_mode != "separate":
        return student, _self_teacher(cfg, student, pg, ctx, stream)
    if ckpt.teacher_remote:  # the teacher lives in a service (remote_teacher.py)
        if ckpt.student_hf:
            _load_hf(student, ckpt.student_hf, cfg.student, pg, "student", stream)
        return student, None
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
    if cfg.checkpoint.teacher_mode != "separate":  # self-distillation: the teacher has the student's shape
        cfg = replace(cfg, teacher=cfg.student)
    validate(cfg, world)
    if cfg.rollout.rl_loss_weight > 0 and cfg.loss.impl == "auto":  # the PG term needs the student's logits
        cfg = replace(cfg, loss=replace(cfg.loss, impl="reference"))
    if cfg.checkpoint.auto_resume and not cfg.checkpoint.load:
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, load=cfg.checkpoint.save))
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
    if teacher is not None:
        teacher_desc = f"teacher: {count_parameters(teacher, pg):,} parameters (frozen)"
    elif cfg.checkpoint.teacher_remote:
        teacher_desc = f"remote top-{cfg.loss.topk} teacher at {cfg.checkpoint.teacher_remote}"
    else:
        teacher_desc = "teacher: the student itself (self-live)"
    _print0(f"student: {count_parameters(student, pg):,} parameters; {teacher_desc}", stream)
    output_mode = kd_loss_output_mode(cfg, ctx.device)
    _print0(f"distillation loss: {'fused output layer + loss' if output_mode == 'hidden' else 'reference'}", stream)
    engine = wrap_stage(DistillStage(student, teacher, output_mode=output_mode,
                                     self_live=cfg.checkpoint.teacher_mode == "self-live"), cfg, pg)
    logger = MetricsLogger(cfg.train.metrics_file, ctx.rank, cfg.train.train_iters, stream=stream)
    data = _data(cfg, pg, world, tokenizer)
    _print0(f"data: {data_source_kind(cfg)}", stream)
    if cfg.rollout.enabled:
        data = _on_policy(data, engine, tokenizer, cfg, ctx, stream)
    ckpt, log = cfg.checkpoint, partial(_print0, stream=stream)
    done_iters = 0
    if ckpt.load:  # after building the data: RNG states are restored last
        done_iters = _resume(engine, cfg, data, log)
    saver = checkpointing.periodic_saver(engine, ckpt, data, cfg.train.train_iters, log=log)
    guard = RunGuard(PreemptionHandler().install(), FaultInjector(), cfg.train.max_skipped_steps, stream,
                     feed=_remote_feed(cfg, pg, ctx))
    start = time.perf_counter()
    try:
        history = _loop(engine, data, cfg.train.train_iters, ctx, logger, cfg.train.log_interval,
                        start=done_iters, after_iteration=saver, guard=guard)
    except Preempted as stop:
        _save_now(engine, cfg, data, stop.iteration, "preemption", log)
        raise SystemExit(EXIT_PREEMPTED) from None
    except TooManySkippedSteps as err:
        _print0(f"error: {err}", stream)
        # Skipped steps changed nothing: the current state is the last good one.
        _save_now(engine, cfg, data, guard.last_iteration, "too many skipped steps", log)
        raise SystemExit(EXIT_TOO_MANY_SKIPS) from None
    finally:
        guard.preemption.uninstall()
        if guard.feed is not None:
            guard.feed.close()
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


def _resume(engine, cfg: DistillConfig, data, log) -> int:
    """``--load``: the newest checkpoint; a damaged newest one is reported and the previous used."""
    from megatron_distill.checkpoint_files import find_latest_complete, list_checkpoints

    ckpt = cfg.checkpoint
    newest = [it for it, _ in list_checkpoints(ckpt.load)]
    good = find_latest_complete(ckpt.load) if newest else None
    if newest and good is None:
        raise ConfigError(f"--load {ckpt.load}: no intact checkpoint (all of iterations {newest} are damaged)")
    if newest and good != newest[-1]:
        from megatron_distill.checkpoint_files import iteration_dir, verify_checkpoint

        bad = iteration_dir(ckpt.load, newest[-1])
        log(f"warning: refusing checkpoint {bad}: {'; '.join(verify_checkpoint(bad))}. "
            f"The newest intact checkpoint is iteration {good}: resuming from iteration {good} instead")
        iteration, _ = checkpointing.load_checkpoint(engine, ckpt.load, iteration=good, data=data,
                                                     load_optim=ckpt.load_optim, load_rng=ckpt.load_rng, log=log)
        return iteration
    return checkpointing.resume_from(engine, ckpt.load, data=data, load_optim=ckpt.load_optim,
                                     load_rng=ckpt.load_rng, log=log)


def _save_now(engine, cfg: DistillConfig, data, iteration: int, why: str, log) -> None:
    """Checkpoint the current state (used when stopping early); a note when --save is not set."""
    from megatron_distill.checkpoint_files import list_checkpoints

    if not cfg.checkpoint.save:
        log(f"stopping ({why}) after iteration {iteration}; no --save directory, so nothing was saved")
        return
    if iteration in [it for it, _ in list_checkpoints(cfg.checkpoint.save)]:
        log(f"stopping ({why}): iteration {iteration} is already saved in {cfg.checkpoint.save}")
        return
    path = checkpointing.save_checkpoint(engine, iteration, cfg.checkpoint.save,
                                         data_state=checkpointing.data_state_of(data, iteration),
                                         keep_last=cfg.checkpoint.keep_last)
    log(f"stopping ({why}): saved checkpoint {path}")


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
