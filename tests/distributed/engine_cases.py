"""Worker used by the engine equivalence tests: one distillation run at a given TP x PP x DP.

Every layout loads the same full (TP1 x PP1) student and teacher weights, sharded for its
rank, trains on the same synthetic global batches, and reports its losses, grad norms and the
first iteration's student gradients mapped back to full-model parameter names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_distill.config import DistillConfig, LossConfig, ModelShape, ParallelConfig, TrainConfig
from megatron_distill.data.synthetic import MarkovSource, SyntheticBatches

VOCAB = 97  # not a multiple of 2 or 4: exercises vocab padding under TP

STUDENT = ModelShape(
    num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
    max_position_embeddings=32, ffn_hidden_size=48, swiglu=True, normalization="RMSNorm",
    position_embedding_type="rope", untie_embeddings_and_output_weights=False,
    hidden_dropout=0.0, attention_dropout=0.0,
)
TEACHER = ModelShape(
    num_layers=2, hidden_size=48, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=32, normalization="LayerNorm", position_embedding_type="learned_absolute",
    untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0,
)


def make_config(tp: int, pp: int, *, kind: str = "jsd", ce_weight: float = 0.3, impl: str = "reference",
                sequence_parallel: bool = False,
                micro_batch_size: int = 2, global_batch_size: int = 8, distributed_optimizer: bool = False,
                train_iters: int = 3, seq_length: int = 16,
                output_layer_grad_accumulation_fusion: bool = True) -> DistillConfig:
    """The shared test config at a given layout."""
    return DistillConfig(
        student=STUDENT,
        teacher=TEACHER,
        parallel=ParallelConfig(tp, pp, sequence_parallel),
        loss=LossConfig(kind=kind, beta=0.4, temperature=1.5, ce_weight=ce_weight, impl=impl),
        train=TrainConfig(
            seq_length=seq_length, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
            train_iters=train_iters, lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant",
            clip_grad=1.0, device="cpu", use_distributed_optimizer=distributed_optimizer,
            output_layer_grad_accumulation_fusion=output_layer_grad_accumulation_fusion,
        ),
    )


def save_full_weights(path: str, seed: int = 7) -> None:
    """Build TP1 x PP1 student and teacher in this (single, initialized) process and save them."""
    from megatron_distill.engine import build_model, init_model_parallel

    cfg = make_config(1, 1)
    pg = init_model_parallel(cfg, seed)
    student = build_model(STUDENT, cfg, pg, trainable=True)
    teacher = build_model(TEACHER, cfg, pg, trainable=False)
    # Random init is small; scale the teacher's output layer so its distribution is peaked
    # and the divergence terms are far from zero.
    with torch.no_grad():
        teacher.output_layer.weight.mul_(8.0)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict()}, path)


def save_full_weights_worker(path: str) -> None:
    """Spawned single-process entry: start the CPU runtime, then ``save_full_weights``."""
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    save_full_weights(path)


def run_layout_worker(weights_path: str, tp: int, pp: int, iters: int = 3, **cfg_kwargs) -> dict:
    """Spawned entry: start the CPU runtime (gloo + Megatron redirect), then ``run_layout``."""
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    return run_layout(weights_path, tp, pp, iters, **cfg_kwargs)


def run_layout(weights_path: str, tp: int, pp: int, iters: int = 3, **cfg_kwargs) -> dict:
    """Train ``iters`` iterations at TP=tp, PP=pp (DP = world / (tp*pp)); return what to compare."""
    from megatron_distill.config import validate
    from megatron_distill.engine import build_model, init_model_parallel, wrap_stage
    from megatron_distill.models.sharding import (
        layer_offset,
        load_full_state_dict,
        param_layouts,
    )
    from megatron_distill.pipeline.stage import DistillStage
    from megatron_distill.training import run_iteration

    cfg = make_config(tp, pp, train_iters=iters, **cfg_kwargs)
    world = dist.get_world_size()
    validate(cfg, world)
    pg = init_model_parallel(cfg, seed=1)
    full = torch.load(weights_path, weights_only=True)
    tp_rank, pp_rank = pg.tp.rank(), pg.pp.rank()
    student = build_model(STUDENT, cfg, pg, trainable=True)
    teacher = build_model(TEACHER, cfg, pg, trainable=False)
    for model, shape, key in ((student, STUDENT, "student"), (teacher, TEACHER, "teacher")):
        load_full_state_dict(
            model, {k: v for k, v in full[key].items() if not k.endswith("_extra_state")},
            num_layers=shape.num_layers, pp_rank=pp_rank, pp_size=pp, tp_rank=tp_rank, tp_size=tp,
            gated_mlp=shape.swiglu,
        )
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
    output_mode = "hidden" if cfg.loss.impl == "fused" else "logits"
    engine = wrap_stage(DistillStage(student, teacher, output_mode=output_mode), cfg, pg)
    data = SyntheticBatches(
        MarkovSource(VOCAB, 4, seed=3), cfg.train.seq_length, cfg.train.global_batch_size,
        cfg.train.micro_batch_size, pg.dp.rank(), cfg.data_parallel_size(world),
    )
    layouts = param_layouts(student, layer_offset(STUDENT.num_layers, pp_rank, pp), STUDENT.swiglu)
    result = {"losses": [], "kd": [], "ce": [], "grad_norms": [], "tokens": [], "grads": {}}
    for it in range(1, iters + 1):
        stats = run_iteration(engine, data.get(it), it, torch.device("cpu"))
        result["losses"].append(stats.loss)
        result["kd"].append(stats.kd_loss)
        result["ce"].append(stats.ce_loss)
        result["grad_norms"].append(stats.grad_norm)
        result["tokens"].append(stats.num_tokens)
        if it == 1 and pg.dp.rank() == 0 and not cfg.train.use_distributed_optimizer:
            for name, param in student.named_parameters():
                layout = layouts[name]
                result["grads"][layout.global_name] = (tp_rank, layout, param.main_grad.detach().clone())
    result["teacher_unchanged"] = all(
        torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items() if torch.is_tensor(v)
    )
    result["teacher_requires_grad"] = any(p.requires_grad for p in teacher.parameters())
    result["teacher_training_mode"] = teacher.training
    return result


def run_keeping_engine(cfg: DistillConfig) -> tuple[list, object]:
    """``runner.run(cfg)`` in this (already started) process; returns its per-iteration statistics
    and the Engine it trained (to inspect weights and optimizer state). Tears down the parallel
    state after."""
    import io

    from megatron.core import parallel_state

    from megatron_distill import runner

    engines = []
    real_wrap = runner.wrap_stage

    def capturing_wrap(*args, **kwargs):
        engines.append(real_wrap(*args, **kwargs))
        return engines[-1]

    runner.wrap_stage = capturing_wrap
    try:
        history = runner.run(cfg, stream=io.StringIO())
        return history, engines[-1]
    finally:
        runner.wrap_stage = real_wrap
        parallel_state.destroy_model_parallel()
