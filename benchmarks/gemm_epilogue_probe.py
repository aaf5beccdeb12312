"""Can a Triton GEMM write the logits' row statistics in its epilogue at cuBLAS speed?
(NOTES_loss_kernel.md, "what would close the gap": the loss inside the GEMMs.)

A persistent TMA GEMM ``z = x @ w.T`` (x ``[M, K]``, w ``[N, K]``, bf16, fp32 accumulation)
whose epilogue rounds each tile to bf16, stores it, and (STATS) also writes each row's max and
sum of 2^((z - max) * c) over the tile's columns into ``[tiles_n, M]`` partials, so that the
statistics pass over the logits (one read of each logits tensor) is not needed. Timed against
torch.mm at the fused loss's chunk shapes (case 1: K = 2048 student, 4096 teacher,
N = 151936), median of CUDA-event timings over repeats, each configuration checked against
torch.mm (logits) and float64 (statistics).

Usage (GPU): python benchmarks/gemm_epilogue_probe.py [OUTDIR]
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

from loss_kernel import timed  # noqa: E402  (benchmarks/, the script's directory)
from run_record import write_device_record  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _logits_stats_kernel(
    x_desc, w_desc, z_desc, m_ptr, s_ptr, M, N, K, scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_SMS: tl.constexpr, STATS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        # column-tile-major order: consecutive programs share the weight tile (L2 reuse)
        pid_n = tile_id // num_pid_m
        pid_m = tile_id % num_pid_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        z = acc.to(z_desc.dtype)
        z_desc.store([off_m, off_n], z)
        if STATS:
            cols = off_n + tl.arange(0, BLOCK_N)
            rows = off_m + tl.arange(0, BLOCK_M)
            zf = tl.where((cols < N)[None, :], z.to(tl.float32), float("-inf"))
            m = tl.max(zf, axis=1)
            s = tl.sum(tl.exp2((zf - m[:, None]) * scale2), axis=1)
            tl.store(m_ptr + pid_n * M + rows, m, mask=rows < M)
            tl.store(s_ptr + pid_n * M + rows, s, mask=rows < M)


def logits_with_stats(x, w, z, cfg, stats=True, temperature=1.0):
    """z = x @ w.T (into ``z``), and per column tile the rows' max / sum-exp ``[tiles_n, M]``."""
    M, K = x.shape
    N = w.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles_n = triton.cdiv(N, bn)
    m = torch.empty((tiles_n, M), device=x.device, dtype=torch.float32)
    s = torch.empty((tiles_n, M), device=x.device, dtype=torch.float32)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    n_tiles = triton.cdiv(M, bm) * tiles_n
    _logits_stats_kernel[(min(sms, n_tiles),)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(z, [bm, bn]), m, s, M, N, K, LOG2E / temperature,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=sms, STATS=stats,
        WARP_SPECIALIZE=cfg["ws"], FLATTEN=not cfg["ws"], num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return m, s


CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, stages=st, warps=w, ws=ws)
    for bm, bn in ((128, 256), (128, 128), (256, 128))
    for st in (3, 4)
    for w in (8,)
    for ws in (False, True)
]
SHAPES = [("student logits", 1024, 2048), ("teacher logits", 1024, 4096), ("teacher logits", 512, 4096),
          ("floor student", 8192, 2048)]
N_VOCAB = 151936


def timed_ms(fn, reps=20, warmup=3) -> float:
    return statistics.median(timed(fn, reps, warmup))


def check(x, w, z, m, s, cfg) -> dict:
    ref = x @ w.T
    bad = (z != ref).float().mean().item()  # same bf16 rounding of fp32 sums, up to order
    zf = z.double()
    bn = cfg["BLOCK_N"]
    err_m = err_s = 0.0
    for j in range(0, min(m.shape[0], 64)):
        part = zf[:, j * bn : (j + 1) * bn]
        mr = part.max(dim=1).values
        sr = torch.exp2((part - mr[:, None]) * LOG2E).sum(dim=1)
        err_m = max(err_m, (m[j].double() - mr).abs().max().item())
        err_s = max(err_s, ((s[j].double() - sr).abs() / sr).max().item())
    return dict(logits_differ_frac=bad, stats_max_abs_err=err_m, stats_sum_rel_err=err_s)


def main() -> None:
    dev = torch.device("cuda")
    out = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(sys.argv), rows=[])
    print(out, flush=True)
    for name, M, K in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(N_VOCAB, K, device=dev) * 2 * K**-0.5).to(torch.bfloat16)
        z = torch.empty(M, N_VOCAB, device=dev, dtype=torch.bfloat16)
        flops = 2 * M * N_VOCAB * K
        t_ref = timed_ms(lambda x=x, w=w, z=z: torch.mm(x, w.T, out=z))
        row = dict(shape=name, M=M, K=K, N=N_VOCAB, method="torch.mm", ms=round(t_ref, 4),
                   tflops=round(flops / t_ref / 1e9, 1))
        out["rows"].append(row)
        print(row, flush=True)
        for cfg in CONFIGS:
            for stats in (False, True):
                try:
                    m, s = logits_with_stats(x, w, z, cfg, stats)
                    torch.cuda.synchronize()
                    t = timed_ms(lambda x=x, w=w, z=z, cfg=cfg, stats=stats: logits_with_stats(x, w, z, cfg, stats))
                    row = dict(shape=name, M=M, K=K, N=N_VOCAB, method="triton", stats=stats, **cfg,
                               ms=round(t, 4), tflops=round(flops / t / 1e9, 1), x_torch=round(t / t_ref, 3))
                    if stats and M <= 1024:
                        m, s = logits_with_stats(x, w, z, cfg, stats)
                        row.update(check(x, w, z, m, s, cfg))
                except Exception as exc:  # a configuration that does not compile or fit
                    row = dict(shape=name, M=M, K=K, method="triton", stats=stats, **cfg, error=repr(exc)[:200])
                out["rows"].append(row)
                print(row, flush=True)
        x = w = z = None
        torch.cuda.empty_cache()
    write_device_record(out, "gemm_epilogue_probe", sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
