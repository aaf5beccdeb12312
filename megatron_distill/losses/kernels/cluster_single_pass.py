"""Launcher of ``cluster_single_pass.cu``: the single-pass loss / dz step of one chunk of bf16
logits with one thread-block cluster per row (Hopper and newer, one process).

Compared with the Triton single pass (``distill_elementwise._single_pass_kernel``), whose
programs of a row meet on a counter in global memory and re-read their segment from L2, a
cluster keeps the row's segments in shared memory and meets behind the hardware cluster
barrier: DRAM sees exactly 3 units (read z_S, z_T, write dz) and no program ever polls. Clusters
never wait on one another, so a launch cannot hang however few of them are resident.

The kernel is compiled at run time with NVRTC through PyTorch (no CUDA toolkit needed) and
cached per (device, kind, build). ``usable`` says whether it can run on a pair
of logits buffers; otherwise callers keep the Triton kernels.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CLUSTER = 8  # blocks per row: the largest portable cluster size
THREADS = 256  # 8 warps: faster than 16 on an H100 (NOTES_loss_kernel.md, iteration 15)
# the kernels' KIND codes (compile-time here, constexpr in the Triton kernels)
KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_SOURCE = Path(__file__).with_name("cluster_single_pass.cu")
_NAME = "distill_cluster_single_pass"
_STATIC_SMEM = 4096  # the kernel's static shared memory (480 bytes) with room to spare
_compiled: dict = {}
# NVRTC options added to every compile, e.g. "-lineinfo" for Nsight Compute's source view
# (benchmarks/cluster_probe.py --lineinfo); set before the first launch, the cache ignores them
EXTRA_NVRTC_OPTIONS: list[str] = []
_failed: set = set()  # device indices where NVRTC or the driver refused the kernel


@dataclass(frozen=True)
class Build:
    """One compiled form of the kernel: blocks per row (``cluster``, up to 16: above 8 with
    Hopper's non-portable cluster sizes), threads per block, row stages in shared memory (2: the
    next row loads while this one is computed), blocks per multiprocessor the registers must
    allow, one-pass online segment statistics, block reductions with one barrier each, vectors
    per loop iteration, the next row prefetched into L2 (``prefetch``), the student segment read
    from L2 instead of held in shared memory (``student_in_l2``: half the shared memory per
    block), JSD's log-ratio kept in fp16 for the dz pass (``store_log_ratio``: one exp2 per
    element there instead of two exp2 and a lg2), and with it JSD's p_S 2^15 kept in fp16 over
    the student logit (``store_student_prob``: no exp2 in the dz pass), and cluster meetings
    where only the partials' writer fences and every thread arrives relaxed (``relaxed``), and
    passes that read a thread's next vectors from shared memory before computing on the current
    ones (``pipelined``), and, with one stage, a dz pass that starts the next row's copy of each
    vector as soon as that vector's dz is written (``load_behind``), no block barrier around a row's
    copy, each thread waiting for its own (``own_copies``), and segment maxima on bf16 pairs with
    the sums' exponents as one fma each against exact bases (``fast_stats``), and the later passes'
    log-probabilities as one fma each against exact row constants (``fma_log_probs``). Named like
    ``c16t256s2m2or`` or ``c8t128s1m2hqa`` (``parse_build``)."""

    cluster: int = CLUSTER
    threads: int = THREADS
    stages: int = 2
    min_blocks: int = 1
    online: bool = False
    fast_reduce: bool = False
    unroll: int = 1
    prefetch: bool = False
    student_in_l2: bool = False
    store_log_ratio: bool = False
    store_student_prob: bool = False
    relaxed: bool = False
    pipelined: bool = False
    load_behind: bool = False
    own_copies: bool = False
    fast_stats: bool = False
    fma_log_probs: bool = False

    @property
    def name(self) -> str:
        """The build's short name, the inverse of ``parse_build``."""
        name = f"c{self.cluster}t{self.threads}"
        for letter, field, number, _ in _NAME_PARTS:
            value = getattr(self, field)
            if number is None:
                name += letter if value else ""
            elif value != _DEFAULTS[field]:
                name += f"{letter}{value}"
        return name

    def defines(self) -> dict:
        """The source's compile-time constants for this build (``_NAME_PARTS``' macros;
        HOLD_STUDENT is the negation of ``student_in_l2``)."""
        out = {"CLUSTER": self.cluster, "THREADS": self.threads}
        for _, field, _, macro in _NAME_PARTS:
            value = int(getattr(self, field))
            out[macro] = 1 - value if macro == "HOLD_STUDENT" else value
        return out


# The optional parts of a build's name after c<cluster>t<threads>, in their order: letter, Build
# field, for a numbered part (shown only where it differs from the default) its digits' pattern
# and meaning (the other parts are flags), and the field's macro in cluster_single_pass.cu
# (HOLD_STUDENT: the negation of student_in_l2).
_NAME_PARTS = (
    ("s", "stages", ("[12]", "stages 1-2"), "STAGES"),
    ("m", "min_blocks", (r"\d", "blocks per SM"), "MINBLOCKS"),
    ("o", "online", None, "ONLINE"),
    ("r", "fast_reduce", None, "FASTRED"),
    ("u", "unroll", (r"\d", "n"), "UNROLL"),
    ("p", "prefetch", None, "PREFETCH"),
    ("l", "student_in_l2", None, "HOLD_STUDENT"),
    ("h", "store_log_ratio", None, "STORE_R"),
    ("q", "store_student_prob", None, "STORE_P"),
    ("a", "relaxed", None, "RELAXED"),
    ("v", "pipelined", None, "PIPE"),
    ("b", "load_behind", None, "LOAD_BEHIND"),
    ("n", "own_copies", None, "OWN_COPIES"),
    ("f", "fast_stats", None, "FAST_STATS"),
    ("e", "fma_log_probs", None, "FMA_LOGP"),
)
_DEFAULTS = {field: getattr(Build(), field) for _, field, _, _ in _NAME_PARTS}
_BUILD_NAME = re.compile(r"c(\d+)t(\d+)" + "".join(
    f"(?:{letter}({number[0]}))?" if number else f"({letter})?" for letter, _, number, _ in _NAME_PARTS))
_NAME_FORM = "".join(f"[{letter}<{number[1]}>]" if number else f"[{letter}]" for letter, _, number, _ in _NAME_PARTS)

# c8t128s1m2abnf: the KL kinds' default (NOTES_loss_kernel.md, iterations 17 and 19-21)
DEFAULT_BUILD = Build(threads=128, stages=1, min_blocks=2, relaxed=True, load_behind=True, own_copies=True,
                      fast_stats=True)


def _options_combine(build: Build) -> bool:
    """Whether the build's options work together (``parse_build`` says why each pair is needed)."""
    p_over_student = not build.store_student_prob or (build.store_log_ratio and not build.student_in_l2)
    return p_over_student and (not build.load_behind or build.stages == 1) and (
        not build.fma_log_probs or build.fast_stats)


def parse_build(name: str) -> Build:
    """``Build`` from a name of the form
    ``c<cluster>t<threads>[s<stages>][m<blocks>][o][r][u<n>][p][l][h][q][a][v][b][n][f][e]``, e.g.
    "c8t128s1m2abnf" (``DEFAULT_BUILD``) or "c16t256m2or"; ``q`` needs ``h`` and not ``l`` (it
    overwrites the student segment held in shared memory), ``b`` needs ``s1`` (it refills the one
    row stage), ``e`` needs ``f`` (its exact row constants start from the exact segment bases)."""
    m = _BUILD_NAME.fullmatch(name.strip())
    build = None
    if m is not None:
        parts = {field: (int(got) if got else _DEFAULTS[field]) if number else bool(got)
                 for (_, field, number, _), got in zip(_NAME_PARTS, m.groups()[2:], strict=True)}
        build = Build(cluster=int(m[1]), threads=int(m[2]), **parts)
    if build is not None and not _options_combine(build):
        build = None
    if build is None or not (1 <= build.cluster <= 16) or build.threads % 32 or not 32 <= build.threads <= 1024:
        raise ValueError(f"cluster kernel build {name!r}: expected c<cluster 1-16>t<threads, a multiple of 32>"
                         f"{_NAME_FORM} (q only with h, without l; b only with s1; e only with f), "
                         "e.g. c8t256 or c16t256m2or")
    return build


def seg_len(n_cols: int, cluster: int = CLUSTER) -> int:
    """Vocab elements per block of a row's cluster: a multiple of 8 (16-byte vectors)."""
    return -(-n_cols // (8 * cluster)) * 8


def shared_bytes(n_cols: int, build: Build = DEFAULT_BUILD) -> int:
    """Dynamic shared memory of one block: ``build.stages`` x (student, teacher) segments, bf16
    (the teacher's only with ``build.student_in_l2``)."""
    rows_held = 1 if build.student_in_l2 else 2
    return rows_held * build.stages * seg_len(n_cols, build.cluster) * 2


def device_supports(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0 or newer where the kernel has not failed
    to compile or load (shapes are checked in ``usable``)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and device.index not in _failed


def usable(zs: torch.Tensor, zt: torch.Tensor, build: Build = DEFAULT_BUILD) -> bool:
    """Whether ``build`` of the cluster kernel can run on these logits: bf16 on a Hopper-class
    GPU, rows of 16-byte vectors (``V_local`` and row strides multiples of 8, aligned buffers),
    and the row stages fit in shared memory."""
    if not device_supports(zs.device) or zs.dtype != torch.bfloat16 or zt.dtype != torch.bfloat16:
        return False
    n_cols = zs.shape[1]
    if n_cols < 8 * build.cluster or n_cols % 8 or zs.stride(0) % 8 or zt.stride(0) % 8:
        return False
    if zs.data_ptr() % 16 or zt.data_ptr() % 16:
        return False
    props = torch.cuda.get_device_properties(zs.device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return shared_bytes(n_cols, build) + _STATIC_SMEM <= optin


def _torch_cuda_lib(*names: str):
    # PyTorch's ctypes handles of NVRTC / the driver (private helpers, renamed across releases)
    from torch.cuda import _utils

    for name in names:
        getter = getattr(_utils, name, None)
        if getter is not None:
            return getter()
    raise RuntimeError(f"this PyTorch has none of torch.cuda._utils.{names}")


def compile_cubin(nvrtc, kind: str, arch: str, build: Build = DEFAULT_BUILD) -> bytes:
    """``build`` of the kernel for ``kind`` compiled by NVRTC (a ctypes handle of libnvrtc) for
    ``arch`` (e.g. "sm_90"): the cubin's bytes. Raises RuntimeError with NVRTC's log on failure."""
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    options = [f"--gpu-architecture={arch}", "--std=c++17", f"-DKIND={KIND_CODES[kind]}"]
    options += [f"-D{k}={v}" for k, v in build.defines().items()] + EXTRA_NVRTC_OPTIONS
    prog = ctypes.c_void_p()
    # named by its full path, so that Nsight Compute finds the source of a -lineinfo build (cubins
    # without line information are the same whatever the name)
    _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), _SOURCE.read_bytes(), str(_SOURCE).encode(),
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


def _compile(device: torch.device, kind: str, build: Build):
    key = (device.index, kind, build)
    if key not in _compiled:
        from torch.cuda._utils import _cuda_load_module

        nvrtc = _torch_cuda_lib("_get_gpu_rtc_library", "_get_nvrtc_library")
        major, minor = torch.cuda.get_device_capability(device)
        cubin = compile_cubin(nvrtc, kind, f"sm_{major}{minor}", build)
        with torch.cuda.device(device):
            kernel = _cuda_load_module(cubin, [_NAME])[_NAME]
        if build.cluster > 8:  # above the portable size: Hopper allows 16 on request
            libcuda = _torch_cuda_lib("_get_gpu_runtime_library", "_get_cuda_library")
            # 14: CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
            if libcuda.cuFuncSetAttribute(kernel.func, 14, 1) != 0:
                raise RuntimeError(f"the driver refused a non-portable cluster size of {build.cluster}")
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


def active_clusters(kernel, device: torch.device, smem: int, build: Build = DEFAULT_BUILD) -> int:
    """Clusters of this kernel the device holds at once (cuOccupancyMaxActiveClusters), or the
    multiprocessor count / cluster size where the driver does not say."""
    key = (device.index, id(kernel), smem)
    if key not in _active:
        fallback = max(torch.cuda.get_device_properties(device).multi_processor_count // build.cluster, 1)
        try:
            libcuda = _torch_cuda_lib("_get_gpu_runtime_library", "_get_cuda_library")
            cfg = _LaunchConfig(fallback * build.cluster, 1, 1, build.threads, 1, 1, smem, None, None, 0)
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
    build: Build = DEFAULT_BUILD,
    n_clusters: int | None = None,
) -> None:
    """Per-row loss partials and dz over ``zs`` for bf16 logits ``zs``, ``zt`` ``[rows, V]``
    (``usable`` must hold). ``loss_out``: fp32 ``[build.cluster, rows]`` (rows contiguous), block r
    of a row's cluster writes its vocab segment's divergence (nats) into ``loss_out[r]``. On return
    ``zs`` holds ``grad_scale * d loss / d (z_S c ln 2)``, the same as the Triton single pass
    (``grad_scale`` here already includes 1 / tau). ``scale2`` = log2(e) / tau. ``n_clusters``
    (default: as many as are resident at once) take rows in turn."""
    rows, n_cols = zs.shape
    cluster = build.cluster
    if loss_out.shape != (cluster, rows) or loss_out.dtype != torch.float32 or loss_out.stride(1) != 1:
        raise ValueError(f"loss_out must be fp32 [{cluster}, {rows}] with contiguous rows, got {tuple(loss_out.shape)}")
    if rows == 0:
        return
    device = zs.device
    smem = shared_bytes(n_cols, build)
    try:
        kernel = _compile(device, kind, build)
        _allow_shared_memory(kernel, smem)
    except Exception:
        _failed.add(device.index)
        raise
    n_clusters = min(n_clusters or active_clusters(kernel, device, smem, build), rows)
    with torch.cuda.device(device):
        kernel(
            grid=(n_clusters * cluster, 1, 1),
            block=(build.threads, 1, 1),
            args=[zs, zt, zs.stride(0), zt.stride(0), loss_out, loss_out.stride(0), rows, n_cols,
                  seg_len(n_cols, cluster),
                  float(scale2), float(beta), float(grad_scale)],
            shared_mem=smem,
        )


__all__ = [
    "CLUSTER", "DEFAULT_BUILD", "KIND_CODES", "Build", "active_clusters", "compile_cubin", "device_supports",
    "loss_grad_", "parse_build", "seg_len", "shared_bytes", "usable",
]
