"""Student optimizer and LR schedule through Megatron-Core (DistributedOptimizer when asked).

Megatron picks TE's or apex's fused Adam when installed and torch's AdamW otherwise.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_distill.config import TrainConfig


def build_optimizer(train: TrainConfig, model_chunks: list, lr: float | None = None,
                    iters: int | None = None):
    """Adam over the trainable parameters of ``model_chunks`` (DDP-wrapped) and its LR schedule.

    ``lr``/``iters`` override the config (used to pre-train the quickstart teacher).
    Returns ``(optimizer, scheduler)``.
    """
    lr = train.lr if lr is None else lr
    iters = train.train_iters if iters is None else iters
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min(train.min_lr, lr),
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=train.bf16,
        params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        use_distributed_optimizer=train.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.lr_warmup_iters > 0 else lr,
        max_lr=lr,
        min_lr=min(train.min_lr, lr),
        lr_warmup_steps=min(train.lr_warmup_iters, max(iters - 1, 0)),
        lr_decay_steps=max(iters, 1),
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(iters, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler
