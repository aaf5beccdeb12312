"""Student optimizer and LR schedule through Megatron-Core (DistributedOptimizer when asked).

Megatron picks TE's or apex's fused Adam when installed and torch's AdamW otherwise. With
``--use-precision-aware-optimizer`` the Adam is ``optim_remainder.RemainderAdamW`` (fp32 master
weights as bf16 weight + 16-bit remainder, moments in ``--exp-avg-dtype`` / ``--exp-avg-sq-dtype``)
inside ``PrecisionAwareOptimizer``, which reads the gradients where Megatron's DDP keeps them.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import param_is_not_shared

from megatron_distill.config import TrainConfig
from megatron_distill.optim_remainder import MOMENT_DTYPES, RemainderAdamW, gradient_of


class PrecisionAwareOptimizer(FP32Optimizer):
    """Megatron optimizer wrapper for ``RemainderAdamW`` over bf16 parameters.

    Megatron's ``FP32Optimizer`` hands ``param.main_grad`` to the inner optimizer as
    ``param.grad``, which torch refuses when their dtypes differ (bf16 weight, fp32 gradient).
    Here the gradients stay in ``main_grad``: the inner optimizer reads them there, and the
    global norm and clipping work on them directly (norm accumulated in fp32).
    """

    def prepare_grads(self) -> bool:
        """Nothing to copy: the gradients are read from ``main_grad``. Never reports an overflow."""
        return False

    def _grads(self, for_norm: bool) -> list[torch.Tensor]:
        grads = []
        for param in self.get_parameters():
            grad = gradient_of(param)
            if grad is None:
                continue
            if for_norm and not (param_is_not_shared(param) and tensor_parallel.param_is_not_tensor_parallel_duplicate(
                    param, getattr(self, "tp_group", None))):
                continue
            grads.append(grad)
        return grads

    def get_main_grads_for_grad_norm(self) -> list[torch.Tensor]:
        """This rank's gradients that count in the global norm (not shared, not a TP duplicate)."""
        return self._grads(for_norm=True)

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        """L2 norm of all gradients over the grad-stats group, summed in fp32."""
        grads = self.get_main_grads_for_grad_norm()
        device = grads[0].device if grads else torch.device("cuda")
        sum_sq = torch.zeros((), dtype=torch.float32, device=device)
        for grad in grads:
            sum_sq += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        torch.distributed.all_reduce(sum_sq, group=self.get_grad_stats_parallel_group())
        return sum_sq.sqrt().item()

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        """Scale every gradient by ``clip_grad / norm`` when the global norm exceeds ``clip_grad``."""
        grad_norm = self.get_grad_norm()
        coefficient = clip_grad / (grad_norm + 1.0e-6)
        if coefficient < 1.0:
            grads = self._grads(for_norm=False)
            if grads:
                torch._foreach_mul_(grads, coefficient)
        return grad_norm

    def count_zeros(self) -> float:
        raise NotImplementedError("counting zero gradients is not supported with --use-precision-aware-optimizer")

    def reload_model_params(self, state_dict=None) -> None:
        """The weights were replaced (loaded without optimizer state): master = the new bf16 weights."""
        if self.optimizer is not None:
            self.optimizer.reset_remainders()


def _init_remainder_state(optimizer: RemainderAdamW, config=None) -> None:
    optimizer.init_all_states()


def _precision_aware(train: TrainConfig, opt_config: OptimizerConfig, model_chunks: list) -> PrecisionAwareOptimizer:
    # Megatron builds the parameter groups (no weight decay on norms and biases, lr/wd multipliers
    # read by the scheduler) around torch's AdamW; the groups move to RemainderAdamW unchanged.
    plain = get_megatron_optimizer(opt_config, model_chunks)
    parts = getattr(plain, "chained_optimizers", [plain])  # megatron-core 0.16 chains even a single one
    if not all(isinstance(part, FP32Optimizer) for part in parts):
        raise TypeError(f"--use-precision-aware-optimizer: expected Megatron's FP32Optimizer(s) over the student, "
                        f"got {[type(part).__name__ for part in parts]}")
    groups = [group for part in parts if part.optimizer is not None for group in part.optimizer.param_groups]
    inner = None
    if groups:
        inner = RemainderAdamW(groups, lr=opt_config.lr, betas=(opt_config.adam_beta1, opt_config.adam_beta2),
                               eps=opt_config.adam_eps, weight_decay=opt_config.weight_decay,
                               exp_avg_dtype=MOMENT_DTYPES[train.exp_avg_dtype],
                               exp_avg_sq_dtype=MOMENT_DTYPES[train.exp_avg_sq_dtype])
    optimizer = PrecisionAwareOptimizer(inner, opt_config, _init_remainder_state)
    for attr in ("grad_stats_parallel_group", "tp_group"):
        if hasattr(parts[0], attr):
            setattr(optimizer, attr, getattr(parts[0], attr))
    return optimizer


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
        # With the precision-aware optimizer the parameters stay bf16 but Megatron's FP32Optimizer
        # path (bf16=False) builds the groups: no fp32 master copies.
        bf16=train.bf16 and not train.use_precision_aware_optimizer,
        params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        use_distributed_optimizer=train.use_distributed_optimizer,
    )
    if train.use_precision_aware_optimizer:
        optimizer = _precision_aware(train, opt_config, model_chunks)
    else:
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
