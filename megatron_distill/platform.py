"""Device and process-group start-up, and the CPU redirect that lets Megatron-Core run without a GPU.

Megatron-Core 0.16.1 assumes CUDA in three places that matter for training: it asks
``torch.cuda.current_device()``, it keeps dropout/init RNG streams in the CUDA generator
(``tensor_parallel.random``), and its schedules and buffers create tensors with
``device="cuda"`` (or a CUDA device index). On a machine without a GPU we redirect all three
to the CPU and use the gloo backend. On a GPU nothing here changes Megatron's behaviour.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU_REDIRECT_ACTIVE = False


def _is_cuda_device_arg(device: object) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda`` (or a CUDA device index) to the CPU in every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device_arg(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts e.g. ``grad.type() == 'torch.cuda.FloatTensor'``.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func in (torch.Tensor.to,) and args:
            args = tuple("cpu" if _is_cuda_device_arg(a) and not isinstance(a, int) else a for a in args)
            if len(args) > 1 and isinstance(args[1], int) and not isinstance(args[1], bool):
                args = (args[0], "cpu") + args[2:]
        return func(*args, **kwargs)


def enable_cpu_redirect() -> None:
    """Make Megatron-Core's CUDA assumptions resolve to the CPU in this process (idempotent).

    Redirects ``torch.cuda.current_device``/``is_available``-adjacent helpers used by Megatron,
    maps the model-parallel RNG tracker onto the CPU default generator, and installs a
    ``TorchFunctionMode`` that turns ``device="cuda"`` into ``device="cpu"``.
    """
    global _CPU_REDIRECT_ACTIVE
    if _CPU_REDIRECT_ACTIVE:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    # A device object, not an index: Megatron passes ``device=torch.cuda.current_device()``
    # also inside autograd backward functions, where the TorchFunctionMode below is not active.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # type: ignore[assignment]
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (a no-op here): leave that one.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)  # type: ignore[assignment]
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The tracker warns whenever the CPU generator moves inside a fork: on the CPU the
    # "CUDA" stream *is* the CPU generator, so that warning is expected and meaningless.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
    _CudaToCpuMode().__enter__()
    _CPU_REDIRECT_ACTIVE = True


@dataclass(frozen=True)
class DeviceContext:
    """Where this process computes: ``device`` is ``cpu`` or ``cuda:<local_rank>``."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(requested: str) -> str:
    """Turn ``--device {auto,cuda,cpu}`` into ``cuda`` or ``cpu`` (auto: cuda when available)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch.cuda.is_available() is False")
    return requested


def init_distributed(device: str, timeout_minutes: float = 10.0) -> DeviceContext:
    """Start ``torch.distributed`` (NCCL on CUDA, gloo on the CPU) from torchrun's environment.

    Without torchrun variables this starts a world of one process. On the CPU the Megatron
    redirect is enabled before anything else touches Megatron-Core.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + (os.getpid() % 1000)))
    if device == "cpu":
        enable_cpu_redirect()
        backend = "gloo"
        torch_device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        backend = "nccl"
        torch_device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DeviceContext(torch_device, backend, rank, world_size, local_rank)
