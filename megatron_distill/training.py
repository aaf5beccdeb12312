"""The iteration loop: one Megatron schedule call per iteration, optimizer step, logging.

Reads top to bottom like the algorithm: get this rank's micro-batches, run forward+backward of
all micro-batches through the pipeline (teacher without grad, student with), let Megatron
finalize the gradients (DP all-reduce, tied embeddings, division by the global token count),
step the optimizer, log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_distill.engine import Engine
from megatron_distill.pipeline.loss_step import (
    RLTerm,
    distill_loss_sums,
    fused_distill_loss_sums,
    topk_distill_loss_sums,
)
from megatron_distill.pipeline.stage import concat_hidden_shapes_fn
from megatron_distill.resilience import step_is_finite

TEACHER_NONFINITE_SLOT = 7


@dataclass
class IterationStats:
    """What one iteration produced, identical on every rank."""

    iteration: int
    loss: float
    kd_loss: float
    ce_loss: float
    num_tokens: int
    lr: float
    grad_norm: float | None
    seconds: float
    tokens_per_sec: float
    skipped: bool = False
    extra: dict = field(default_factory=dict)


def _to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device``; non-tensor entries (e.g. ``meta``) stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _flag_teacher(stats: dict, teacher_out: torch.Tensor | None) -> dict:
    """Record whether the teacher's output for this micro-batch holds a non-finite value."""
    if teacher_out is not None:
        stats["teacher_nonfinite"] = (~torch.isfinite(teacher_out)).any().to(torch.float32).detach()
    return stats


def align_teacher_output(out: tuple, teacher_index: torch.Tensor, output_mode: str) -> tuple:
    """Reorder the teacher's last-stage output so position t is the one predicting the student's label t.

    ``teacher_index`` ``[b, s]`` (data/privileged.py; -1 where no teacher position exists: those
    tokens are already out of the loss mask). Logits mode: teacher logits ``[b, s, V_local]``;
    hidden mode: teacher hidden states ``[s, b, h]`` (full sequence, no sequence parallelism).
    """
    index = teacher_index.clamp(min=0)
    if output_mode == "hidden":
        student_hidden, student_weight, teacher_hidden, teacher_weight = out
        idx = index.transpose(0, 1).unsqueeze(-1).expand(-1, -1, teacher_hidden.shape[-1])
        return student_hidden, student_weight, teacher_hidden.gather(0, idx), teacher_weight
    student_logits, teacher_logits = out
    idx = index.unsqueeze(-1).expand(-1, -1, teacher_logits.shape[-1])
    return student_logits, teacher_logits.gather(1, idx)


def _rl_term(engine: Engine, batch: dict) -> RLTerm | None:
    """The policy-gradient term of an on-policy micro-batch (``onpolicy.py``), or None."""
    rollout = engine.cfg.rollout
    if rollout.rl_loss_weight <= 0 or "advantages" not in batch:
        return None
    temperature = rollout.temperature if rollout.temperature > 0 else 1.0
    return RLTerm(batch["advantages"], rollout.rl_loss_weight, temperature)


def schedule_loss_scale(engine: Engine) -> float | None:
    """The factor Megatron's schedule multiplies each micro-batch's loss by before backward
    (``config.grad_scale_func``, the optimizer's ``scale_loss``): 1 without a gradient scaler
    (bf16, fp32); a dynamic fp16 scaler's current scale. None without an optimizer."""
    if engine.optimizer is None:
        return None
    scaler = getattr(engine.optimizer, "grad_scaler", None)
    return 1.0 if scaler is None else float(scaler.scale)


def make_forward_step(engine: Engine, device: torch.device) -> Callable:
    """Megatron ``forward_step_func``: runs the stage, binds the teacher's output into the loss."""
    loss_cfg = engine.cfg.loss
    fusion_loss_scale = schedule_loss_scale(engine) if engine.cfg.train.output_layer_grad_accumulation_fusion else None

    def forward_step(data_iterator, model):
        batch = _to_device(next(data_iterator), device)
        out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                    teacher_input_ids=batch.get("teacher_tokens"),
                    teacher_position_ids=batch.get("teacher_position_ids"))
        if not engine.stage.post_process:
            return out, None
        if "teacher_index" in batch:  # privileged context: bring the teacher's positions to the student's
            out = align_teacher_output(out, batch["teacher_index"], engine.stage.output_mode)
        if "inject_teacher_nan" in batch:  # fault-injection test hook (resilience.FaultInjector)
            out = (out[0], *(t + float("nan") if i == 1 and t is not None else t for i, t in enumerate(out[1:], 1)))
        if "teacher_topk_ids" in batch:  # remote top-k teacher (remote_teacher.py): no local teacher
            hidden_mode = engine.stage.output_mode == "hidden"

            def topk_loss_func(output_tensor):
                return topk_distill_loss_sums(
                    output_tensor, batch, loss_cfg, engine.vocab_shard, engine.pg.tp,
                    student_weight=out[1] if hidden_mode else None,
                    sequence_parallel=engine.cfg.parallel.sequence_parallel,
                )

            return out[0], topk_loss_func
        if engine.stage.output_mode == "hidden":
            student_hidden, student_weight, teacher_hidden, teacher_weight = out

            def fused_loss_func(output_tensor):
                loss, tokens, stats = fused_distill_loss_sums(
                    output_tensor, student_weight, teacher_hidden, teacher_weight, batch["loss_mask"],
                    loss_cfg, engine.vocab_shard, engine.pg.tp, engine.cfg.parallel.sequence_parallel,
                    on_policy=batch.get("on_policy"), loss_scale=fusion_loss_scale,
                )
                return loss, tokens, _flag_teacher(stats, teacher_hidden)

            return student_hidden, fused_loss_func
        student_logits, teacher_logits = out

        def loss_func(teacher_logits, output_tensor):
            loss, tokens, stats = distill_loss_sums(
                output_tensor, teacher_logits, batch["labels"], batch["loss_mask"],
                loss_cfg, engine.vocab_shard, engine.pg.tp,
                on_policy=batch.get("on_policy"), rl=_rl_term(engine, batch),
            )
            return loss, tokens, _flag_teacher(stats, teacher_logits)

        return student_logits, partial(loss_func, teacher_logits)

    return forward_step


def run_iteration(engine: Engine, microbatches: list[dict], iteration: int, device: torch.device,
                  forward_only: bool = False) -> IterationStats:
    """Forward+backward over this rank's micro-batches and one optimizer step.

    ``microbatches``: this DP rank's list of ``[b, s]`` batches. Returns global statistics
    (loss = weighted loss per unmasked token of the whole global batch).
    """
    start = time.perf_counter()
    cfg, pg, stage = engine.cfg, engine.pg, engine.stage
    seq_length = microbatches[0]["tokens"].shape[1]
    micro_batch_size = microbatches[0]["tokens"].shape[0]
    engine.model.train()
    if not forward_only:
        engine.model.zero_grad_buffer()
        engine.optimizer.zero_grad()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fwd_bwd = get_forward_backward_func(pp_size=pg.pp.size(), vp_size=None)
    kwargs = {}
    if pg.pp.size() > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pg.pp, config=stage.config)
        kwargs["pg_collection"] = pg
        if stage.teacher_hidden > 0:  # a teacher (or self-live) rides along in the p2p tensor
            kwargs["adjust_tensor_shapes_fn"] = concat_hidden_shapes_fn(
                stage.student_hidden, stage.teacher_hidden
            )
    else:
        kwargs["pg_collection"] = pg
    outputs = fwd_bwd(
        forward_step_func=make_forward_step(engine, device),
        data_iterator=iter(microbatches),
        model=[engine.model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **kwargs,
    )
    sync()
    fwd_bwd_end = time.perf_counter()
    sums, bad_microbatches = _global_sums(outputs, len(microbatches), pg, device)
    grad_norm = None
    skipped = False
    lr = engine.optimizer.param_groups[0]["lr"] if engine.optimizer is not None else 0.0
    extra = {}
    if not forward_only:
        # A non-finite loss or gradient on any rank skips the step on every rank: no parameter,
        # optimizer-state or LR-schedule change (resilience.py).
        if step_is_finite(sums, engine.model, device):
            success, grad_norm, _ = engine.optimizer.step()
            skipped = not success
            if success:
                engine.scheduler.step(increment=1)
        else:
            skipped = True
            extra["skip_reason"] = "non-finite loss or gradient"
            extra["nonfinite_microbatches"] = bad_microbatches
            if sums[TEACHER_NONFINITE_SLOT] > 0:
                extra["skip_reason"] = "the teacher produced non-finite outputs"
    sync()
    optimizer_end = time.perf_counter()
    kd_sum, ce_sum, tokens, kd_on, tokens_on, pg_sum = sums.tolist()[:6]
    denom = max(tokens, 1.0)
    weighted = cfg.loss.kd_weight * kd_sum + cfg.loss.ce_weight * ce_sum
    if cfg.rollout.rl_loss_weight > 0:
        weighted += cfg.rollout.rl_loss_weight * pg_sum
    loss = weighted / denom
    if "on_policy" in microbatches[0]:  # on-policy batches (onpolicy.py): the loss by part, the RL term
        extra["on_policy_tokens"] = int(tokens_on) if math.isfinite(tokens_on) else -1
        if tokens_on > 0:  # per-token means of each part (its own token count)
            extra["kd_loss_on_policy"] = kd_on / tokens_on
        if tokens - tokens_on > 0:
            extra["kd_loss_off_policy"] = (kd_sum - kd_on) / (tokens - tokens_on)
        if cfg.rollout.rl_loss_weight > 0:
            extra["pg_loss"] = pg_sum / denom
    seconds = time.perf_counter() - start
    global_tokens = seq_length * micro_batch_size * len(microbatches) * cfg.data_parallel_size(
        dist.get_world_size()
    )
    return IterationStats(
        iteration=iteration,
        loss=loss,
        kd_loss=kd_sum / denom,
        ce_loss=ce_sum / denom,
        num_tokens=int(tokens) if math.isfinite(tokens) else -1,
        lr=lr,
        grad_norm=None if grad_norm is None else float(grad_norm),
        seconds=seconds,
        tokens_per_sec=global_tokens / seconds,
        skipped=skipped,
        extra={
            "forward_backward_seconds": fwd_bwd_end - start,
            "optimizer_seconds": optimizer_end - fwd_bwd_end,
            **extra,
        },
    )


def _global_sums(outputs, num_microbatches: int, pg, device: torch.device):
    """Loss sums of the global batch (same on every rank) and the indices of non-finite micro-batches.

    Only last-stage ranks hold per-micro-batch sums, replicated over TP: sum over the world and
    divide by TP. Slots: 0 kd sum, 1 ce sum, 2 tokens, 3..6 loss-specific sums (on-policy batches:
    3 kd on-policy, 4 tokens on-policy, 5 policy-gradient sum; loss_step.py), 7 the number of
    micro-batches whose teacher output was non-finite.
    """
    width = TEACHER_NONFINITE_SLOT + 1
    sums = torch.zeros(width, dtype=torch.float64, device=device)
    bad = torch.zeros(num_microbatches, dtype=torch.float64, device=device)
    for i, out in enumerate(outputs or []):
        local = out["sums"].to(torch.float64)
        sums[: local.numel()] += local
        if "teacher_nonfinite" in out:
            sums[TEACHER_NONFINITE_SLOT] += out["teacher_nonfinite"].to(torch.float64)
        if not torch.isfinite(local).all():
            bad[i] = 1.0
    dist.all_reduce(sums)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    sums /= pg.tp.size()
    return sums, [i for i, flag in enumerate(bad.tolist()) if flag > 0]
