"""Energy per call of the floor, the fused loss and its parts (case 1 of loss_kernel.py), on one GPU.

On a power-capped GPU (an H100 at its 700 W limit runs these GEMMs at ~1.37 GHz, not 1.98) a
call's time follows its energy more than its cycle count: work that saves cycles but not
joules (a better GEMM tile, a kernel with fewer stalls) gains little end to end. This probe
measures joules per call through NVML's energy counter, next to the time, for:

* the floor (the four bare products) and the fused loss per kind (forward and backward);
* the fused loss's GEMMs at its chunk plan without the element-wise kernels between them;
* its element-wise kernels alone: one call's launches of the single pass per kind (the chunk
  plan's sub-chunks), on logits made once (each launch overwrites its student rows with dz, so
  later rounds run on other values; the cost per element does not depend on them).

Each round runs every method ``--calls`` times back to back (shuffled order per round) and
reads the counter and CUDA events around the batch; medians over ``--rounds``. Prints a table
and writes JSON to OUTDIR (default benchmarks/results).

Usage (GPU): python benchmarks/sweeps/energy_probe.py [OUTDIR] [--rounds 8] [--calls 12] [--tag TAG]
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from loop_profile import chunk_gemms  # noqa: E402
from loss_kernel import CASES, KINDS, environment, make_inputs, make_methods  # noqa: E402
from run_record import write_device_record  # noqa: E402

from megatron_distill.losses.fused import plan_chunks, uses_single_pass  # noqa: E402
from megatron_distill.losses.kernels import distill_elementwise as ew  # noqa: E402


class EnergyCounter:
    """NVML's total energy counter of GPU 0 (millijoules since the driver loaded)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)), "handle")

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"NVML {what} failed with code {result}")

    def millijoules(self) -> int:
        value = ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)), "energy")
        return value.value


def kernels_alone(h, w, ht, wt, kind: str, chunk: int, sub: int):
    """One fused call's single-pass launches for ``kind`` on logits computed once."""
    n, v = h.shape[0], w.shape[0]
    with torch.no_grad():
        zs = h[:chunk] @ w.T
        zt = ht[:sub] @ wt.T
    split = ew.single_pass_split(v, h.device, kind=kind, dtype=zs.dtype)
    loss = torch.zeros((split, sub), dtype=torch.float32, device=h.device)
    starts = [(c0, t0) for c0 in range(0, n, chunk) for t0 in range(0, min(chunk, n - c0), sub)]

    def fn():
        for c0, t0 in starts:
            rows = min(sub, n - c0 - t0)
            ew.single_pass_loss_grad_(zs[t0 : t0 + rows], zt[:rows], loss[:, :rows], kind=kind, beta=KINDS[kind],
                                      temperature=1.0, grad_scale=1e-4)

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=12, help="calls per method and round (kernels alone: 10x)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    case = CASES["T8k_V152k"]
    h, w, ht, wt = make_inputs(case, 0, case["V"])
    floor, _, fused, _ = make_methods(h, w, ht, wt, None)
    dev = h.device
    chunk, sub = plan_chunks(case["T"], case["V"], case["h_s"], 2, dev, teacher_quarter=uses_single_pass("triton", 1))
    methods = {"floor (4 GEMMs)": floor, "chunk GEMMs alone": chunk_gemms(h, w, ht, wt, chunk, sub)}
    for kind in ("forward_kl", "jsd"):
        methods[f"fused {kind}"] = fused(kind)
        methods[f"kernels alone {kind}"] = kernels_alone(h, w, ht, wt, kind, chunk, sub)
    counter = EnergyCounter()
    for fn in methods.values():  # compile, warm up
        fn()
        fn()
    torch.cuda.synchronize()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(methods)
        rng.shuffle(order)
        for name in order:
            calls = args.calls * (10 if name.startswith("kernels") else 1)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0 = counter.millijoules()
            start.record()
            for _ in range(calls):
                methods[name]()
            end.record()
            torch.cuda.synchronize()
            e1 = counter.millijoules()
            samples[name].append((start.elapsed_time(end) / calls, (e1 - e0) / calls))
    rows = []
    for name, got in samples.items():
        ms = statistics.median(t for t, _ in got)
        mj = statistics.median(e for _, e in got)
        watts = statistics.median(e / t for t, e in got)
        rows.append(dict(method=name, ms_per_call=round(ms, 3), joules_per_call=round(mj / 1e3, 4),
                         watts=round(watts, 1), samples=[(round(t, 3), round(e, 1)) for t, e in got]))
        print(f"{name:<28} {ms:9.3f} ms {mj / 1e3:8.4f} J {watts:7.1f} W", flush=True)
    out = dict(environment(1), command="python " + " ".join(sys.argv), chunk=chunk, sub_chunk=sub,
               calls=args.calls, rounds=args.rounds, rows=rows)
    write_device_record(out, "energy_probe", args.outdir, args.tag)


if __name__ == "__main__":
    main()
