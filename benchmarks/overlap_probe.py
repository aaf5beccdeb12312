"""Does an element-wise step run beside a cuBLAS GEMM? (NOTES_loss_kernel.md, iteration 9: the
premise of an overlapped chunk loop, tried in commit 3c47445 and removed: no gain.)

Two measurements at case 1's sub-chunk shapes (512 rows, V = 151936, bf16):

1. the GEMMs alone with an SM carveout of k multiprocessors (torch's experimental setting,
   cuBLASLt's SM count target), per BLAS library: if the library honours it, a compute-bound
   GEMM slows by about 132 / (132 - k);
2. a GEMM (high-priority stream, carveout k) and the multi-pass element-wise step of one
   sub-chunk (low-priority stream) issued together, against the two one after the other on one
   stream without carveout (the plain loop): the span of each, median over repeats (CUDA events
   on the caller's stream). The element-wise step includes a copy that restores its input.

Writes benchmarks/results/overlap_probe_<device>_<date>.json. Usage: python benchmarks/overlap_probe.py
"""

from __future__ import annotations

import contextlib
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss_kernel import environment, multi_pass_step, timed  # noqa: E402

from megatron_distill.losses.kernels import distill_elementwise as ew  # noqa: E402

ROWS, V, H_S, H_T = 512, 151936, 2048, 4096
CARVEOUTS = (0, 8, 16, 24, 32, 48, 66)
REPS = 30


@contextlib.contextmanager
def sm_carveout(n_sms: int, blas: str):
    """GEMMs issued inside leave ``n_sms`` multiprocessors free (torch's experimental carveout,
    cuBLASLt's SM count target) and use the BLAS library ``blas``; both restored on exit."""
    prev_carveout = torch._C._get_sm_carveout_experimental()
    prev_blas = torch.backends.cuda.preferred_blas_library()
    torch._C._set_sm_carveout_experimental(n_sms if n_sms > 0 else None)
    torch.backends.cuda.preferred_blas_library(blas)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev_carveout)
        torch.backends.cuda.preferred_blas_library(prev_blas)


def median_ms(fn) -> float:
    return round(statistics.median(timed(fn, REPS, 3)), 4)


def main() -> None:
    dev = torch.device("cuda")
    bf = dict(device=dev, dtype=torch.bfloat16)
    ht, wt = torch.randn(ROWS, H_T, **bf), torch.randn(V, H_T, **bf) * H_T**-0.5
    hs, ws = torch.randn(ROWS, H_S, **bf), torch.randn(V, H_S, **bf) * H_S**-0.5
    zt, zs, zs0 = torch.empty(ROWS, V, **bf), torch.empty(ROWS, V, **bf), hs @ ws.T
    gh = torch.empty(ROWS, H_S, **bf)
    gemms = {
        "teacher_logits": lambda: torch.mm(ht, wt.T, out=zt),
        "grad_h": lambda: torch.mm(zs0, ws, out=gh),
    }
    split = ew.default_split(ROWS, V, dev)
    loss = torch.empty(split, ROWS, device=dev)
    zt_ew = hs @ ws.T  # teacher logits of the element-wise step (a copy: the GEMM writes zt)

    def ew_step(kind):
        def fn():
            zs.copy_(zs0)  # dz overwrites the logits
            multi_pass_step(zs, zt_ew, loss, kind, split)
        return fn

    copy_only = median_ms(lambda: zs.copy_(zs0))
    out = dict(environment=environment(1), shapes=dict(rows=ROWS, V=V, h_s=H_S, h_t=H_T), reps=REPS,
               copy_ms=copy_only, gemm_alone=[], element_wise_alone={}, pairs=[])
    for kind in ("forward_kl", "jsd"):
        out["element_wise_alone"][kind] = median_ms(ew_step(kind))
    for blas in ("cublas", "cublaslt"):
        for k in CARVEOUTS:
            for name, fn in gemms.items():
                with sm_carveout(k, blas):
                    ms = median_ms(fn)
                out["gemm_alone"].append(dict(gemm=name, blas=blas, carveout=k, ms=ms))
                print(f"gemm {name:<15} {blas:<9} carveout {k:>3}: {ms:.4f} ms", flush=True)
    high, low = torch.cuda.Stream(priority=-8), torch.cuda.Stream(priority=0)
    for blas in ("cublas", "cublaslt"):
        for k in CARVEOUTS:
            for name, gemm in gemms.items():
                for kind in ("forward_kl", "jsd"):
                    step = ew_step(kind)

                    def serial(gemm=gemm, step=step, blas=blas):  # today's loop: no carveout
                        with sm_carveout(0, blas):
                            gemm()
                        step()

                    def paired(gemm=gemm, step=step, k=k, blas=blas):
                        caller = torch.cuda.current_stream()
                        high.wait_stream(caller)
                        low.wait_stream(caller)
                        with torch.cuda.stream(high), sm_carveout(k, blas):
                            gemm()
                        with torch.cuda.stream(low):
                            step()
                        caller.wait_stream(high)
                        caller.wait_stream(low)

                    row = dict(gemm=name, kind=kind, blas=blas, carveout=k, serial_ms=median_ms(serial),
                               paired_ms=median_ms(paired))
                    row["saved_ms"] = round(row["serial_ms"] - row["paired_ms"], 4)
                    out["pairs"].append(row)
                    print(f"pair {name:<15} {kind:<10} {blas:<9} k={k:>3}: serial {row['serial_ms']:.4f} "
                          f"paired {row['paired_ms']:.4f} (saved {row['saved_ms']:.4f})", flush=True)
    slug = out["environment"]["device"].replace("NVIDIA ", "").replace(" ", "-")
    day = datetime.date.today().isoformat()
    path = Path(__file__).resolve().parent / "results" / f"overlap_probe_{slug}_{day}.json"
    if len(sys.argv) > 1:
        path = Path(sys.argv[1]) / path.name
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
