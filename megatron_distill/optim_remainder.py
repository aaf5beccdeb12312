"""AdamW whose fp32 master weights are the bf16 parameters plus a 16-bit remainder.

Megatron's mixed precision keeps, per student parameter, the bf16 weight (2 bytes), an fp32
gradient (4), an fp32 master copy (4) and two fp32 Adam moments (8): 18 bytes. The top 16 bits of
an fp32 master weight are, up to rounding, the bf16 weight itself, so keeping only its low 16
bits beside the bf16 weight holds the fp32 master exactly, in 2 bytes instead of 4 (what
Transformer Engine's FusedAdam calls ``store_param_remainders``, which Megatron-LM uses under
``--use-precision-aware-optimizer``; this is a plain-torch version, so it needs neither TE nor
apex). With the moments in bf16 too the state is 2 + 2 + 4 + 2 + 2 = 12 bytes per parameter, and
10 with bf16 gradients.

The update is torch's AdamW (decoupled weight decay, bias correction) computed in fp32 on the
reconstructed master weight: on CUDA by one Triton kernel per parameter
(``optim_remainder_kernel``), elsewhere by torch ops in slices of at most ``SLICE_ELEMENTS``
elements so that their fp32 temporaries stay small next to the 262 M-element embedding of a
128k vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SLICE_ELEMENTS = 1 << 24  # 64 MB of fp32 temporaries per tensor in flight
MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HALF_ULP = 0x8000  # half a unit of the low 16 bits
_STATE_DTYPE_KEYS = ("exp_avg", "exp_avg_sq", "param_remainder")


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split fp32 ``master`` (any shape) into ``(weight, remainder)``, both of its shape.

    ``weight`` (bf16) is ``master`` rounded to the nearest bf16 (halfway cases away from zero);
    ``remainder`` (int16) is the difference of the two bit patterns, so that
    ``join_master(weight, remainder)`` gives ``master`` back bit for bit.
    """
    bits = master.contiguous().view(torch.int32)
    high = (bits + _HALF_ULP) >> 16  # arithmetic shift: the rounded top 16 bits, sign included
    remainder = bits - (high << 16)  # in [-32768, 32767]
    return high.to(torch.int16).view(torch.bfloat16), remainder.to(torch.int16)


def join_master(weight: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master weight held by bf16 ``weight`` and int16 ``remainder`` (same shape)."""
    high = weight.contiguous().view(torch.int16).to(torch.int32)
    return ((high << 16) + remainder.to(torch.int32)).view(torch.float32)


def gradient_of(param: torch.Tensor) -> torch.Tensor | None:
    """``param``'s gradient, same shape: ``param.main_grad`` where Megatron's DDP accumulates it
    (fp32 or bf16 by --main-grads-dtype; ``param.grad`` is unused there), else ``param.grad``."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


class RemainderAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters with exact fp32 master weights (bf16 weight + int16 remainder).

    Per parameter state: ``param_remainder`` (int16, the parameter's shape), ``exp_avg`` and
    ``exp_avg_sq`` (``exp_avg_dtype`` / ``exp_avg_sq_dtype``, each ``torch.float32`` or
    ``torch.bfloat16``), ``step`` (a 0-dim fp32 tensor, as torch's AdamW keeps it). The gradient
    is read from ``param.main_grad`` when present (Megatron DDP), else ``param.grad``.
    ``use_kernel``: True / False forces the Triton kernel / the torch ops (tests); None picks the
    kernel for CUDA parameters.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, exp_avg_dtype: torch.dtype = torch.float32,
                 exp_avg_sq_dtype: torch.dtype = torch.float32, use_kernel: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.use_kernel = use_kernel  # None: the Triton kernel for CUDA tensors, torch ops otherwise
        self.exp_avg_dtype = exp_avg_dtype
        self.exp_avg_sq_dtype = exp_avg_sq_dtype
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype != torch.bfloat16:
                    raise TypeError(f"RemainderAdamW keeps fp32 master weights for bf16 parameters; "
                                    f"got a {param.dtype} parameter of shape {tuple(param.shape)}")
                if not param.is_contiguous():
                    raise ValueError(f"RemainderAdamW needs contiguous parameters (shape {tuple(param.shape)})")

    def init_state(self, param: torch.Tensor) -> dict:
        """Create the zero state of ``param`` if it has none (its master weight is then the bf16 value)."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["param_remainder"] = torch.zeros_like(param, dtype=torch.int16)
            state["exp_avg"] = torch.zeros_like(param, dtype=self.exp_avg_dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.exp_avg_sq_dtype)
        return state

    def init_all_states(self) -> None:
        """Create every parameter's state (checkpoint loading fills these tensors in place)."""
        for group in self.param_groups:
            for param in group["params"]:
                self.init_state(param)

    def reset_remainders(self) -> None:
        """Make the master weights equal the current bf16 parameters (after weights are loaded)."""
        for state in self.state.values():
            if "param_remainder" in state:
                state["param_remainder"].zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter that has a gradient. Returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = gradient_of(param)
                if grad is None:
                    continue
                state = self.init_state(param)
                state["step"] += 1
                step = int(state["step"].item())
                kernel = param.is_cuda if self.use_kernel is None else self.use_kernel
                if kernel:
                    from megatron_distill.optim_remainder_kernel import adamw_remainder_update_

                    adamw_remainder_update_(param.data, state["param_remainder"], grad.contiguous(),
                                            state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1,
                                            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                            step=step)
                else:
                    self._update(param, grad, state, group["lr"], beta1, beta2, group["eps"],
                                 group["weight_decay"], step)
        return loss

    @staticmethod
    def _update(param: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, step: int) -> None:
        # torch.optim.AdamW's single-tensor arithmetic, in the same order, on fp32 copies of a slice.
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        flat = (param.view(-1), grad.reshape(-1), state["param_remainder"].view(-1),
                state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1))
        for start in range(0, param.numel(), SLICE_ELEMENTS):
            p, g, r, m_store, v_store = (t[start:start + SLICE_ELEMENTS] for t in flat)
            g = g.float()
            m = m_store.float()  # a copy for bf16 moments; the stored tensor itself for fp32
            v = v_store.float()
            master = join_master(p, r)
            master.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            master.addcdiv_(m, denom, value=-step_size)
            weight, remainder = split_master(master)
            p.copy_(weight)
            r.copy_(remainder)
            if m is not m_store:
                m_store.copy_(m)
            if v is not v_store:
                v_store.copy_(v)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, keeping each state tensor in its own dtype.

        torch casts every state tensor but ``step`` to its parameter's dtype (bf16), which would
        round fp32 moments and garble the int16 remainders; they are put back from ``state_dict``
        afterwards, the moments in this optimizer's dtypes.
        """
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        kept = {pid: {k: v for k, v in state_dict["state"][pid].items() if k in _STATE_DTYPE_KEYS}
                for pid in saved_ids if pid in state_dict["state"]}
        super().load_state_dict(state_dict)
        dtypes = {"exp_avg": self.exp_avg_dtype, "exp_avg_sq": self.exp_avg_sq_dtype, "param_remainder": torch.int16}
        for pid, param in zip(saved_ids, params, strict=True):
            for key, value in kept.get(pid, {}).items():
                self.state[param][key] = value.to(device=param.device, dtype=dtypes[key])
