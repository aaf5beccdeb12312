"""Launcher of ``cluster_single_pass.cu``: the single-pass loss / dz step of one chunk of bf16
logits with one thread-block cluster per row (Hopper and newer, one process).

Compared with the Triton single pass (``distill_elementwise._single_pass_kernel``), whose
programs of a row meet on a counter in global memory and re-read their segment from L2, a
cluster keeps the row's segments in shared memory and meets behind the hardware cluster
barrier: DRAM sees exactly 3 units (read z_S, z_T, write dz) and no program ever polls. Clusters
never wait on one another, so a launch cannot hang however few of them are resident.

The kernel is compiled at run time with NVRTC through PyTorch (no CUDA toolkit needed) and
cached per (device, kind, cluster size, threads). ``usable`` says whether it can run on a pair
of logits buffers; otherwise callers keep the Triton kernels.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

CLUSTER = 8  # blocks per row: the largest portable cluster size
THREADS = 512
# the kernels' KIND codes (compile-time here, constexpr in the Triton kernels)
KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_SOURCE = Path(__file__).with_name("cluster_single_pass.cu")
_NAME = "distill_cluster_single_pass"
_STATIC_SMEM = 4096  # the kernel's static shared memory (480 bytes) with room to spare
_compiled: dict = {}
_failed: set = set()  # device indices where NVRTC or the driver refused the kernel


def seg_len(n_cols: int, cluster: int = CLUSTER) -> int:
    """Vocab elements per block of a row's cluster: a multiple of 8 (16-byte vectors)."""
    return -(-n_cols // (8 * cluster)) * 8


def shared_bytes(n_cols: int, cluster: int = CLUSTER, stages: int = 2) -> int:
    """Dynamic shared memory of one block: ``stages`` x (student, teacher) segments, bf16."""
    return 2 * stages * seg_len(n_cols, cluster) * 2


def device_supports(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0 or newer where the kernel has not failed
    to compile or load (shapes are checked in ``usable``)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and device.index not in _failed


def usable(zs: torch.Tensor, zt: torch.Tensor) -> bool:
    """Whether the cluster kernel can run on these logits: bf16 on a Hopper-class GPU, rows of
    16-byte vectors (``V_local`` and row strides multiples of 8, aligned buffers), and both
    row stages fit in shared memory."""
    if not device_supports(zs.device) or zs.dtype != torch.bfloat16 or zt.dtype != torch.bfloat16:
        return False
    n_cols = zs.shape[1]
    if n_cols < 8 * CLUSTER or n_cols % 8 or zs.stride(0) % 8 or zt.stride(0) % 8:
        return False
    if zs.data_ptr() % 16 or zt.data_ptr() % 16:
        return False
    props = torch.cuda.get_device_properties(zs.device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return shared_bytes(n_cols) + _STATIC_SMEM <= optin


def _torch_cuda_lib(*names: str):
    # PyTorch's ctypes handles of NVRTC / the driver (private helpers, renamed across releases)
    from torch.cuda import _utils

    for name in names:
        getter = getattr(_utils, name, None)
        if getter is not None:
            return getter()
    raise RuntimeError(f"this PyTorch has none of torch.cuda._utils.{names}")


def compile_cubin(nvrtc, kind: str, arch: str, threads: int = THREADS, cluster: int = CLUSTER,
                  defines: dict | None = None) -> bytes:
    """The kernel for ``kind`` compiled by NVRTC (a ctypes handle of libnvrtc) for ``arch``
    (e.g. "sm_90"): the cubin's bytes. ``defines``: further compile-time constants of the
    source (STAGES, MINBLOCKS, ONLINE, UNROLL). Raises RuntimeError with NVRTC's log on failure."""
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    options = [f"--gpu-architecture={arch}", "--std=c++17", f"-DKIND={KIND_CODES[kind]}", f"-DCLUSTER={cluster}",
               f"-DTHREADS={threads}"] + [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    prog = ctypes.c_void_p()
    _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), _SOURCE.read_bytes(), _SOURCE.name.encode(),
                                                 0, None, None))
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        if nvrtc.nvrtcCompileProgram(prog, len(options), opts) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed on {_SOURCE.name} ({' '.join(options)}):\n"
                               f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin))
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def _check_nvrtc(nvrtc, result: int) -> None:
    if result != 0:
        raise RuntimeError(f"NVRTC error {result}: {nvrtc.nvrtcGetErrorString(result)}")


def _compile(device: torch.device, kind: str, threads: int, cluster: int, defines: dict | None):
    key = (device.index, kind, threads, cluster, tuple(sorted((defines or {}).items())))
    if key not in _compiled:
        from torch.cuda._utils import _cuda_load_module

        nvrtc = _torch_cuda_lib("_get_gpu_rtc_library", "_get_nvrtc_library")
        major, minor = torch.cuda.get_device_capability(device)
        cubin = compile_cubin(nvrtc, kind, f"sm_{major}{minor}", threads, cluster, defines)
        with torch.cuda.device(device):
            kernel = _cuda_load_module(cubin, [_NAME])[_NAME]
        if cluster > 8:  # above the portable size: Hopper allows 16 on request
            libcuda = _torch_cuda_lib("_get_gpu_runtime_library", "_get_cuda_library")
            # 14: CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
            if libcuda.cuFuncSetAttribute(kernel.func, 14, 1) != 0:
                raise RuntimeError(f"the driver refused a non-portable cluster size of {cluster}")
        _compiled[key] = kernel
    return _compiled[key]


def _allow_shared_memory(kernel, smem: int) -> None:
    # kernels need an opt-in above 48 KB of dynamic shared memory
    if hasattr(kernel, "set_shared_memory_config"):
        kernel.set_shared_memory_config(smem)
    else:  # pragma: no cover - PyTorch releases before the helper
        libcuda = _torch_cuda_lib("_get_gpu_runtime_library", "_get_cuda_library")
        if libcuda.cuFuncSetAttribute(kernel.func, 8, smem) != 0:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            raise RuntimeError(f"cuFuncSetAttribute refused {smem} bytes of dynamic shared memory")


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
        ("numAttrs", ctypes.c_uint),
    ]


_active: dict = {}


def active_clusters(kernel, device: torch.device, smem: int, threads: int = THREADS, cluster: int = CLUSTER) -> int:
    """Clusters of this kernel the device holds at once (cuOccupancyMaxActiveClusters), or the
    multiprocessor count / ``cluster`` where the driver does not say."""
    key = (device.index, id(kernel), smem, threads)
    if key not in _active:
        fallback = max(torch.cuda.get_device_properties(device).multi_processor_count // cluster, 1)
        try:
            libcuda = _torch_cuda_lib("_get_gpu_runtime_library", "_get_cuda_library")
            cfg = _LaunchConfig(fallback * cluster, 1, 1, threads, 1, 1, smem, None, None, 0)
            n = ctypes.c_int()
            rc = libcuda.cuOccupancyMaxActiveClusters(ctypes.byref(n), kernel.func, ctypes.byref(cfg))
            _active[key] = n.value if rc == 0 and n.value > 0 else fallback
        except Exception:  # pragma: no cover - older drivers / PyTorch without the helpers
            _active[key] = fallback
    return _active[key]


def loss_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    kind: str,
    beta: float,
    scale2: float,
    grad_scale: float,
    n_clusters: int | None = None,
    threads: int = THREADS,
    cluster: int = CLUSTER,
    defines: dict | None = None,
) -> None:
    """Per-row loss partials and dz over ``zs`` for bf16 logits ``zs``, ``zt`` ``[rows, V]``
    (``usable`` must hold). ``loss_out``: fp32 ``[CLUSTER, rows]`` (rows contiguous), block r of
    a row's cluster writes its vocab segment's divergence (nats) into ``loss_out[r]``. On return
    ``zs`` holds ``grad_scale * d loss / d (z_S c ln 2)``, the same as the Triton single pass
    (``grad_scale`` here already includes 1 / tau). ``scale2`` = log2(e) / tau. ``n_clusters``
    (default: as many as are resident at once) take rows in turn; ``threads`` per block;
    ``cluster`` blocks per row (``loss_out`` then has that many partial rows) and ``defines``
    (``compile_cubin``) select other builds of the kernel, for the benchmarks."""
    rows, n_cols = zs.shape
    if loss_out.shape != (cluster, rows) or loss_out.dtype != torch.float32 or loss_out.stride(1) != 1:
        raise ValueError(f"loss_out must be fp32 [{cluster}, {rows}] with contiguous rows, got {tuple(loss_out.shape)}")
    if rows == 0:
        return
    device = zs.device
    smem = shared_bytes(n_cols, cluster, int((defines or {}).get("STAGES", 2)))
    try:
        kernel = _compile(device, kind, threads, cluster, defines)
        _allow_shared_memory(kernel, smem)
    except Exception:
        _failed.add(device.index)
        raise
    n_clusters = min(n_clusters or active_clusters(kernel, device, smem, threads, cluster), rows)
    with torch.cuda.device(device):
        kernel(
            grid=(n_clusters * cluster, 1, 1),
            block=(threads, 1, 1),
            args=[zs, zt, zs.stride(0), zt.stride(0), loss_out, loss_out.stride(0), rows, n_cols,
                  seg_len(n_cols, cluster),
                  float(scale2), float(beta), float(grad_scale)],
            shared_mem=smem,
        )


__all__ = [
    "CLUSTER", "KIND_CODES", "active_clusters", "compile_cubin", "device_supports", "loss_grad_", "seg_len", "usable",
]
