"""Is the fused loss's weight-gradient accumulation faster as a persistent Triton GEMM whose
epilogue is a TMA reduce-add? (NOTES_loss_kernel.md, iteration 13.)

Per chunk of C tokens the fused loss does ``grad_W += dz^T h`` (dz ``[C, V]``, h ``[C, h_s]``,
grad_W ``[V, h_s]``): a GEMM with K = C = 1024 (case 1) whose output, the whole weight gradient,
is read and written once per chunk (1.24 GB in bf16, 2.49 GB in the engine's fp32 main_grad).
cuBLAS runs it at ~600-650 TFLOP/s against ~720 at K = 8192: each output tile's read-add-write
sits after a short main loop. A persistent kernel can hand that work to the TMA unit
(``cp.reduce.async.bulk``: the L2 adds the tile into grad_W while the program goes on to its next
tile). Timed here against torch at the fused loss's chunk shapes, each variant checked against
float64; median of CUDA-event timings over repeats.

Variants (``MODE``): ``store`` (first chunk: grad_W = dz^T h), ``reduce`` (TMA reduce-add into
grad_W), ``rmw`` (load the grad_W tile, add, store: one rounding like cuBLAS's beta = 1).

Usage (GPU): python benchmarks/weight_grad_probe.py [OUTDIR]
CPU check: TRITON_INTERPRET=1 python benchmarks/weight_grad_probe.py --check
"""

from __future__ import annotations

import datetime
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("store", "reduce", "rmw")


@triton.jit
def _weight_grad_kernel(
    dz_desc, h_desc, g_desc, M, N, K, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr,
    MODE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    # g [M = V, N = h] (+)= alpha * dz[K, M]^T @ h[K, N]
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        # n fastest: the programs working at one time share a few dz column blocks (read from
        # DRAM once, then from L2); h (K x N) is small and stays in L2
        pid_m = tile_id // num_pid_n
        pid_n = tile_id % num_pid_n
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = dz_desc.load([ki * BLOCK_K, off_m])
            b = h_desc.load([ki * BLOCK_K, off_n])
            acc = tl.dot(a.T, b, acc)
        acc = acc * alpha
        if MODE == "store":
            g_desc.store([off_m, off_n], acc.to(g_desc.dtype))
        elif MODE == "reduce":
            g_desc.atomic_add([off_m, off_n], acc.to(g_desc.dtype))
        else:
            c = g_desc.load([off_m, off_n]).to(tl.float32)
            g_desc.store([off_m, off_n], (c + acc).to(g_desc.dtype))


def weight_grad_(g: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, cfg: dict, mode: str, alpha: float = 1.0):
    """``g`` ``[V, h_s]`` = (store) or += (reduce, rmw) ``alpha * dz^T h``; dz ``[C, V]``, h ``[C, h_s]``."""
    K, M = dz.shape
    N = h.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sms = torch.cuda.get_device_properties(dz.device).multi_processor_count if dz.is_cuda else 4
    n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    _weight_grad_kernel[(min(sms, n_tiles),)](
        TensorDescriptor.from_tensor(dz, [bk, bm]), TensorDescriptor.from_tensor(h, [bk, bn]),
        TensorDescriptor.from_tensor(g, [bm, bn]), M, N, K, alpha,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=sms, MODE=mode,
        WARP_SPECIALIZE=cfg["ws"], FLATTEN=not cfg["ws"], num_warps=cfg["warps"], num_stages=cfg["stages"],
    )


def torch_weight_grad_(g, dz, h, mode: str, alpha: float = 1.0):
    """What the fused loss does today (output_layer_grads._accumulate_weight_grad)."""
    if mode == "store":
        torch.mm(dz.t(), h, out=g)
    elif g.dtype == dz.dtype:
        g.addmm_(dz.t(), h, alpha=alpha)
    else:
        torch.addmm(g, dz.t(), h, alpha=alpha, out_dtype=torch.float32, out=g)


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g.double() - ref).norm() / ref.norm()).item()


def check_case(C: int, V: int, H: int, g_dtype, cfg, mode, device, in_dtype=torch.bfloat16) -> dict:
    """Fresh random inputs; ``g`` poisoned (store) or random (accumulate); error vs float64."""
    dz = (torch.randn(C, V, device=device) * 1e-3).to(in_dtype)
    h = torch.randn(C, H, device=device).to(in_dtype)
    alpha = 0.75
    if mode == "store":
        g = torch.full((V, H), float("nan"), device=device, dtype=g_dtype)
        base = torch.zeros((V, H), dtype=torch.float64, device=device)
        a = 1.0
    else:
        g = (torch.randn(V, H, device=device) * 0.03).to(g_dtype)
        base = g.double()
        a = alpha
    ref = base + a * (dz.double().t() @ h.double())
    weight_grad_(g, dz, h, cfg, mode, a)
    out = dict(C=C, V=V, H=H, g_dtype=str(g_dtype), mode=mode, rel_err=rel_err(g, ref),
               nan=bool(torch.isnan(g).any()))
    if device != "cpu":
        g2 = base.to(g_dtype) if mode != "store" else torch.empty_like(g)
        torch_weight_grad_(g2, dz, h, mode, a)
        out["torch_rel_err"] = rel_err(g2, ref)
    return out


CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, stages=st, warps=8, ws=ws)
    for bm, bn in ((128, 256), (256, 128))
    for st in (3, 4)
    for ws in (False, True)
]
# (name, C = K, V = M, h_s = N): the fused loss's weight-gradient GEMM per chunk, and the floor's
SHAPES = [("case 1 chunk", 1024, 151936, 2048), ("case 2 chunk", 2048, 128256, 4096)]


def main() -> None:
    if "--check" in sys.argv:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, stages=2, warps=4, ws=False)
        # the interpreter has no TMA reduce, and reads bf16 through descriptors wrongly (3.9)
        for mode in ("store", "rmw"):
            for g_dtype in (torch.float16, torch.float32):
                print(check_case(40, 96, 64, g_dtype, cfg, mode, "cpu", in_dtype=torch.float16))
        return
    from loss_kernel import timed  # noqa: E402  (benchmarks/, the script's directory)
    from run_record import write_device_record  # noqa: E402

    dev = torch.device("cuda")
    out = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(sys.argv), rows=[])
    print({k: v for k, v in out.items() if k != "rows"}, flush=True)

    def ms(fn) -> float:
        return statistics.median(timed(fn, 20, 3))

    for name, C, V, H in SHAPES:
        flops = 2 * C * V * H
        dz = (torch.randn(C, V, device=dev) * 1e-3).to(torch.bfloat16)
        h = torch.randn(C, H, device=dev).to(torch.bfloat16)
        for g_dtype in (torch.bfloat16, torch.float32):
            g = (torch.randn(V, H, device=dev) * 0.03).to(g_dtype)
            modes = ("store", "reduce", "rmw") if g_dtype == torch.bfloat16 else ("reduce",)
            for mode in modes:
                t_ref = ms(lambda g=g, dz=dz, h=h, mode=mode: torch_weight_grad_(g, dz, h, mode))
                row = dict(shape=name, C=C, V=V, H=H, g_dtype=str(g_dtype), mode=mode, method="torch",
                           ms=round(t_ref, 4), tflops=round(flops / t_ref / 1e9, 1))
                out["rows"].append(row)
                print(row, flush=True)
                for cfg in CONFIGS:
                    try:
                        chk = check_case(C, V, H, g_dtype, cfg, mode, dev) if C == SHAPES[0][1] else {}
                        t = ms(lambda g=g, dz=dz, h=h, cfg=cfg, mode=mode: weight_grad_(g, dz, h, cfg, mode))
                        row = dict(shape=name, C=C, V=V, H=H, g_dtype=str(g_dtype), mode=mode, method="triton", **cfg,
                                   ms=round(t, 4), tflops=round(flops / t / 1e9, 1), x_torch=round(t / t_ref, 3),
                                   rel_err=chk.get("rel_err"), torch_rel_err=chk.get("torch_rel_err"),
                                   nan=chk.get("nan"))
                    except Exception as exc:  # a configuration that does not compile or fit
                        row = dict(shape=name, g_dtype=str(g_dtype), mode=mode, method="triton", **cfg,
                                   error=repr(exc)[:300])
                    out["rows"].append(row)
                    print(row, flush=True)
            g = None
        # the floor's rate for the same product at K = 8192 (one GEMM over all tokens)
        if C == SHAPES[0][1]:
            big = (torch.randn(8192, V, device=dev) * 1e-3).to(torch.bfloat16)
            hb = torch.randn(8192, H, device=dev).to(torch.bfloat16)
            gb = torch.empty(V, H, device=dev, dtype=torch.bfloat16)
            t = ms(lambda big=big, hb=hb, gb=gb: torch.mm(big.t(), hb, out=gb))
            row = dict(shape="floor grad_W", C=8192, V=V, H=H, method="torch", mode="store", ms=round(t, 4),
                       tflops=round(2 * 8192 * V * H / t / 1e9, 1))
            out["rows"].append(row)
            print(row, flush=True)
            big = hb = gb = None
        dz = h = None
        torch.cuda.empty_cache()
    print("\nbest per (shape, g_dtype, mode): torch ms / triton ms")
    for name, *_ in SHAPES:
        for key in sorted({(r["g_dtype"], r["mode"]) for r in out["rows"] if r["shape"] == name}):
            rs = [r for r in out["rows"] if r["shape"] == name and (r.get("g_dtype"), r["mode"]) == key]
            tr = [r for r in rs if r["method"] == "torch"]
            tt = [r for r in rs if r["method"] == "triton" and "ms" in r]
            best = min(tt, key=lambda r: r["ms"]) if tt else None
            print(name, key, tr[0]["ms"] if tr else None, best and (best["ms"], best["BLOCK_M"], best["BLOCK_N"],
                                                                    best["stages"], best["ws"], best.get("rel_err")))
    write_device_record(out, "weight_grad_probe", sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
