"""Assemble a run: Megatron parallel state, this rank's DistillStage, DDP wrapper, optimizer.

Everything is built from an explicit ``DistillConfig`` and returned in an ``Engine`` object; the
process groups live in one ``ProcessGroupCollection`` passed to whatever needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_distill.config import DistillConfig, ModelShape
from megatron_distill.models.builder import build_gpt_stage, padded_vocab_size, transformer_config
from megatron_distill.optim import build_optimizer
from megatron_distill.pipeline.loss_step import VocabShard
from megatron_distill.pipeline.stage import DistillStage


def init_model_parallel(cfg: DistillConfig, seed: int) -> ProcessGroupCollection:
    """Create Megatron's TP/PP/DP groups (once per process) and seed the model-parallel RNGs."""
    par = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            distributed_timeout_minutes=cfg.train.distributed_timeout_minutes,  # type: ignore[arg-type]
        )
    set_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def set_seed(seed: int) -> None:
    """Seed the CPU generator and Megatron's model-parallel RNG tracker (offset per PP stage)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(seed + 100 * pp_rank)


def stage_flags(pg: ProcessGroupCollection) -> tuple[bool, bool]:
    """(pre_process, post_process) for this rank's pipeline stage."""
    return pg.pp.rank() == 0, pg.pp.rank() == pg.pp.size() - 1


def build_model(shape: ModelShape, cfg: DistillConfig, pg: ProcessGroupCollection, *, trainable: bool,
                device: torch.device | str = "cpu"):
    """This rank's stage of one GPT model on ``device``, in the training dtype."""
    pre, post = stage_flags(pg)
    # The fusions are for CUDA: torch.compile's CPU backend needs a C++ toolchain at run time, and
    # the Triton RoPE would run in the interpreter.
    on_cuda = torch.device(device).type == "cuda"
    recompute = set(cfg.train.recompute_modules) if trainable else set()  # a frozen model keeps nothing
    tcfg = transformer_config(shape, cfg.parallel, bf16=cfg.train.bf16, for_training=trainable,
                              swiglu_fusion=cfg.train.bias_swiglu_fusion and on_cuda,
                              recompute_norms="layernorm" in recompute, rope_fusion=cfg.train.rope_fusion and on_cuda)
    model = build_gpt_stage(
        shape, tcfg, pre_process=pre, post_process=post, pg_collection=pg,
        transformer_impl=cfg.train.transformer_impl, recompute_swiglu="swiglu" in recompute,
    )
    # Like Megatron-LM's Float16Module: the whole stage (norms included) in the training dtype.
    return model.to(device=device, dtype=tcfg.params_dtype)


def kd_loss_output_mode(cfg: DistillConfig, device: torch.device) -> str:
    """``"hidden"`` (fused output layer + loss) or ``"logits"`` (reference loss on logits).

    ``--kd-loss-impl auto`` takes the fused kernel on CUDA when there is no cross-entropy term
    (the fused path computes the distillation term only), the reference otherwise.
    """
    impl = cfg.loss.impl
    privileged_sp = cfg.parallel.sequence_parallel and (
        cfg.checkpoint.teacher_mode != "separate" or cfg.data.privileged_template
    )
    if impl == "auto":
        fused_ok = device.type == "cuda" and cfg.loss.ce_weight == 0 and not privileged_sp
        impl = "fused" if fused_ok else "reference"
    if impl == "fused" and privileged_sp:
        raise ValueError("privileged context with --sequence-parallel needs --kd-loss-impl reference "
                         "(the teacher's positions are realigned on the full sequence)")
    return "hidden" if impl == "fused" else "logits"


@dataclass
class Engine:
    """A ready-to-train stage: the DDP-wrapped DistillStage, its optimizer and LR schedule."""

    cfg: DistillConfig
    pg: ProcessGroupCollection
    model: DistributedDataParallel
    stage: DistillStage
    optimizer: object
    scheduler: object
    vocab_shard: VocabShard

    @property
    def transformer_config(self):
        return self.stage.config


def wrap_stage(stage: DistillStage, cfg: DistillConfig, pg: ProcessGroupCollection,
               lr: float | None = None, iters: int | None = None) -> Engine:
    """Wrap a stage in Megatron DDP (student params only), build optimizer and scheduler."""
    tcfg = stage.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.train.main_grads_dtype == "fp32",
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.train.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=stage, pg_collection=pg)
    optimizer, scheduler = build_optimizer(cfg.train, [model], lr=lr, iters=iters)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = model.no_sync
    tcfg.grad_scale_func = optimizer.scale_loss
    tp_size, tp_rank = pg.tp.size(), pg.tp.rank()
    vocab = cfg.student.vocab_size
    shard = VocabShard.for_rank(vocab, padded_vocab_size(vocab, tp_size), tp_rank, tp_size)
    return Engine(cfg, pg, model, stage, optimizer, scheduler, shard)
