"""Where do the fused loss's GEMMs lose time against the floor's? (NOTES_loss_kernel.md, iteration 13.)

Profiles, for case 1 of loss_kernel.py (bf16, T=8192, h_s=2048, h_t=4096, V=151936):

* the floor's four GEMMs (one call each over all tokens);
* one fused call per kind at the default chunking, each of its GEMMs labelled by its input
  shapes (student logits, teacher logits, grad_h, grad_W) and its Triton kernels;
* the same chunk GEMMs (the fused loss's chunk plan) issued back to back without the
  element-wise kernels between them;
* each of these timed with CUDA events as loss_kernel.py times it, and after a short (~2 ms) and
  a long (~30 ms) sleep kernel queued before the start event, which let the host enqueue ahead of
  the GPU. On a power-limited GPU the sleep also lets the card cool, so these differences mix host
  overhead with clock changes (notes, iteration 13);
* the GPU's idle gaps inside one call (CUDA-only profiler, little host overhead of its own), the
  host's first ops of a fused call, a cProfile of one call, and the host cost of plan_chunks.

Kernel durations come from the CUDA profiler (the kernels each aten::mm / addmm launched),
medians over ``REPS`` profiled calls. Prints tables and writes JSON to OUTDIR.

Usage (GPU): python benchmarks/loop_profile.py [OUTDIR] [--chunks auto,1536:768,...] [--tag TAG]
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss_kernel import make_methods, peak_extra_gib  # noqa: E402  (benchmarks/, the script's directory)
from run_record import write_device_record  # noqa: E402

from megatron_distill.losses import fused_linear_distill_loss  # noqa: E402
from megatron_distill.losses.fused import plan_chunks, uses_single_pass  # noqa: E402

T, H_S, H_T, V = 8192, 2048, 4096, 151936
REPS = 3
ROUNDS = 20
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")
LABELS = ("student logits", "teacher logits", "grad_h", "grad_W")


def gemm_label(name: str, shapes: list) -> str:
    """Which of the four products an aten::mm / addmm call is, from its input shapes."""
    if name != "aten::mm":
        return "grad_W"  # addmm / addmm_: the weight gradient's accumulation
    second = list(shapes[1]) if len(shapes) > 1 else []
    if second == [H_T, V]:
        return "teacher logits"
    if second == [H_S, V]:
        return "student logits"
    if second == [V, H_S]:
        return "grad_h"
    return "grad_W"


def profiled(fn) -> tuple[list[tuple[str, float]], list[tuple[str, float]], float]:
    """``fn`` once under the profiler: (GEMM label, its kernels' ms) in launch order, (other
    kernel name, ms) and the wall ms."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    gemms, gemm_kernels = [], set()
    for e in events:
        if e.name in GEMM_OPS and e.device_type == torch.autograd.DeviceType.CPU and e.kernels:
            gemms.append((gemm_label(e.name, e.input_shapes), sum(k.duration for k in e.kernels) / 1e3))
            gemm_kernels.update(k.name for k in e.kernels)
    others = [
        (e.name, (e.time_range.end - e.time_range.start) / 1e3)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in gemm_kernels
    ]
    return gemms, others, wall


SLEEP_CYCLES = 60_000_000  # ~30-35 ms at the H100's clocks: longer than any call's host time


SHORT_SLEEP_CYCLES = 4_000_000  # ~2-3 ms: covers the host's work before a call's first kernel


def event_ms(fn, sleep_cycles: int) -> tuple[float, float]:
    """(GPU ms between events around ``fn``, host ms of ``fn``); a sleep kernel of
    ``sleep_cycles`` queued before the start event lets the host run that far ahead of the GPU
    (a long one holds the GPU until everything is enqueued; it also lets the GPU cool down)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), host


def label_loop(gemms: list[tuple[str, float]]) -> dict[str, list[float]]:
    """GEMM ms per call, grouped by label."""
    out: dict[str, list[float]] = defaultdict(list)
    for label, ms in gemms:
        out[label].append(ms)
    return out


def chunk_gemms(hs, ws, ht, wt, chunk: int, teacher_chunk: int):
    """A function that runs the fused loop's four products once at its chunk plan (student chunks
    of ``chunk`` rows, teacher sub-chunks of ``teacher_chunk``; hidden states ``[T, h]``, weights
    ``[V, h]``), without the element-wise kernels between them; buffers allocated per call, as
    the fused loss does."""

    def run():
        n, v = hs.shape[0], ws.shape[0]
        buf_s = torch.empty(chunk, v, device=hs.device, dtype=hs.dtype)
        buf_t = torch.empty(teacher_chunk, v, device=hs.device, dtype=ht.dtype)
        gh = torch.empty(hs.shape, device=hs.device, dtype=hs.dtype)
        gw = torch.empty(ws.shape, device=hs.device, dtype=ws.dtype)
        h_d, w_d = hs.detach(), ws.detach()
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            zs = buf_s[: c1 - c0]
            torch.mm(h_d[c0:c1], w_d.t(), out=zs)
            for t0 in range(c0, c1, teacher_chunk):
                t1 = min(t0 + teacher_chunk, c1)
                torch.mm(ht[t0:t1], wt.t(), out=buf_t[: t1 - t0])
            torch.mm(zs, w_d, out=gh[c0:c1])
            if c0 == 0:
                torch.mm(zs.t(), h_d[c0:c1], out=gw)
            else:
                gw.addmm_(zs.t(), h_d[c0:c1])

    return run


def profile_gemms(fn) -> tuple[dict, list[list[tuple[str, float]]]]:
    """Two warm-up calls of ``fn``, then ``REPS`` profiled ones: ``wall_ms`` (median),
    ``gemm_ms`` (per label, the call's sum, median), ``gemm_total_ms``, ``gemm_per_call_ms`` (the
    first profiled call's GEMMs per label) and ``n_gemm_calls``; and each call's other kernels."""
    for _ in range(2):
        fn()
    per_label: dict[str, list[float]] = defaultdict(list)
    first, walls, others_per_call = None, [], []
    for _ in range(REPS):
        gemms, others, wall = profiled(fn)
        walls.append(wall)
        others_per_call.append(others)
        labelled = label_loop(gemms)
        first = first or labelled
        for lab, ms in labelled.items():
            per_label[lab].append(sum(ms))
    row = dict(wall_ms=round(statistics.median(walls), 4), n_gemm_calls=len(gemms),
               gemm_ms={k: round(statistics.median(v), 4) for k, v in per_label.items()},
               gemm_per_call_ms={k: [round(x, 4) for x in v] for k, v in first.items()})
    row["gemm_total_ms"] = round(sum(row["gemm_ms"].values()), 4)
    return row, others_per_call


def gaps(fn, top: int = 12) -> dict:
    """``fn`` once under the CUDA-only profiler (little host overhead): the GPU's idle time
    between consecutive kernels, in total and the largest gaps with their neighbours."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = sorted(
        ((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
         if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start),
    )
    found = []
    for i in range(1, len(ks)):
        gap = ks[i][0] - max(k[1] for k in ks[:i])
        if gap > 0:
            found.append((gap, i, ks[i - 1][2][:50], ks[i][2][:50]))
    found.sort(reverse=True)
    return dict(
        kernels=len(ks), span_ms=round((ks[-1][1] - ks[0][0]) / 1e3, 4),
        idle_ms=round(sum(g for g, *_ in found) / 1e3, 4),
        largest=[dict(us=round(g, 1), index=i, after=a, before=b) for g, i, a, b in found[:top]],
    )


def host_timeline(fn, first: int = 16) -> list[dict]:
    """The first ``first`` top-level host ops of ``fn`` (GPU held by a sleep kernel): start
    offset and duration in microseconds, to see what comes before the first GEMM."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    torch.cuda.synchronize()
    def top_aten(e) -> bool:
        return e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))

    ops = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and top_aten(e)),
                 key=lambda e: e.time_range.start)
    t0 = ops[0].time_range.start if ops else 0
    return [dict(op=e.name[:60], start_us=round(e.time_range.start - t0, 1),
                 us=round(e.time_range.end - e.time_range.start, 1)) for e in ops[:first]]


def host_profile(fn, calls: int = 3, top: int = 30, sort: str = "tottime", sleep: bool = True) -> str:
    """cProfile of ``fn``'s host work over ``calls`` calls, sorted by ``sort``: where the host's
    time to enqueue the work goes. With ``sleep`` a sleep kernel holds the GPU during each call
    (so no call waits for the device); without, each call starts on an idle GPU."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        if sleep:
            torch.cuda._sleep(SLEEP_CYCLES)
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(top)
    return buf.getvalue()


def parse_chunks(text: str) -> list[tuple[int | None, int | None, bool]]:
    """"auto,1536:768,1536:512x" -> [(None, None, False), (1536, 768, False), (1536, 512, True)]:
    chunk and teacher sub-chunk lengths; "x": chunks of exactly C tokens (a shorter last one)
    instead of plan_chunks' equal split."""
    out = []
    for item in text.split(","):
        if item == "auto":
            out.append((None, None, False))
        else:
            c, ct = item.rstrip("x").split(":")
            out.append((int(c), int(ct), item.endswith("x")))
    return out


def chunk_sweep(configs, hs, ws, ht, wt, out: dict, rounds: int = ROUNDS) -> None:
    """For each (C, C_t): both kinds' GEMM time by product and Triton time (profiled), peak extra
    memory, and the per-round ratio to the floor over ``rounds`` rounds in a new random order each."""
    import random

    floor = make_methods(hs, ws, ht, wt, None)[0]

    from megatron_distill.losses import fused as fused_module

    balanced = fused_module._balanced

    def fused(kind, c, ct, exact):
        def run():
            if exact:  # chunks of exactly c tokens
                fused_module._balanced = lambda n, max_len, align: min(n, max_len)
            try:
                loss = fused_linear_distill_loss(hs, ws, ht, wt, kind, chunk_tokens=c, teacher_chunk_tokens=ct)
            finally:
                fused_module._balanced = balanced
            loss.backward()
            hs.grad = ws.grad = None
        return run

    methods = {"floor": floor}
    for c, ct, exact in configs:
        for kind in ("forward_kl", "jsd"):
            methods[f"{kind} C={c or 'auto'}{'x' if exact else ''} C_t={ct or 'auto'}"] = fused(kind, c, ct, exact)
    rows = {}
    for name, fn in methods.items():
        row, others_per_call = profile_gemms(fn)
        triton_ms = [sum(ms for kname, ms in others if "_kernel" in kname and "at::native" not in kname)
                     for others in others_per_call]
        rows[name] = dict(row, peak_extra_gib=round(peak_extra_gib(fn, lambda: None), 4),
                          triton_ms=round(statistics.median(triton_ms), 4))
        print(name, json.dumps(rows[name]), flush=True)
    rng = random.Random(0)
    ratios: dict[str, list[float]] = defaultdict(list)
    names = list(methods)
    for _ in range(rounds):
        rng.shuffle(names)
        times = {n: event_ms(methods[n], 0)[0] for n in names}
        for n in names:
            ratios[n].append(times[n] / times["floor"])
    for n in methods:
        q = statistics.quantiles(ratios[n], n=4)
        rows[n]["x_floor_per_round"] = [round(q[1], 4), round(q[0], 4), round(q[2], 4)]
    out["chunk_sweep"] = dict(rounds=rounds, rows=rows)
    floor_gemm = rows["floor"]["gemm_ms"]
    print("\nx floor per round: median [q1, q3] | peak extra GiB | GEMM ms over the floor's: student, teacher,"
          " grad_h, grad_W | Triton ms")
    for n, r in rows.items():
        over = [r["gemm_ms"].get(lab, 0.0) - floor_gemm.get(lab, 0.0) for lab in LABELS]
        print(f"{n:34s} {r['x_floor_per_round'][0]:.3f} [{r['x_floor_per_round'][1]:.3f}, "
              f"{r['x_floor_per_round'][2]:.3f}] | {r['peak_extra_gib']:.3f} | "
              + " ".join(f"{x:+.2f}" for x in over) + f" | {r['triton_ms']:.2f}")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default=None, help="default: benchmarks/results")
    ap.add_argument("--chunks", default=None, metavar="C:C_t,...",
                    help="only compare these chunkings (and 'auto'): GEMM time by product, memory, ratio to the floor")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds of --chunks")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    hs = torch.randn(T, H_S, device=dev, dtype=torch.bfloat16)
    ht = torch.randn(T, H_T, device=dev, dtype=torch.bfloat16)
    ws = (torch.randn(V, H_S, device=dev) * H_S**-0.5).to(torch.bfloat16).requires_grad_()
    wt = (torch.randn(V, H_T, device=dev) * H_T**-0.5).to(torch.bfloat16)
    hs.requires_grad_()
    out = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(sys.argv), shapes=dict(T=T, h_s=H_S, h_t=H_T, V=V), runs={})
    print({k: v for k, v in out.items() if k != "runs"}, flush=True)
    if args.chunks:
        chunk_sweep(parse_chunks(args.chunks), hs, ws, ht, wt, out, args.rounds)
        write_device_record(out, "loop_profile", args.outdir, args.tag)
        return
    chunk, teacher_chunk = plan_chunks(T, V, H_S, 2, dev, teacher_quarter=uses_single_pass("triton", 1))

    floor = make_methods(hs, ws, ht, wt, None)[0]

    def fused(kind, backward=True):
        def run():
            loss = fused_linear_distill_loss(hs, ws, ht, wt, kind)
            if backward:
                loss.backward()
            hs.grad = ws.grad = None
        return run

    methods = {"floor": floor, "chunk GEMMs alone": chunk_gemms(hs, ws, ht, wt, chunk, teacher_chunk),
               "fused forward_kl": fused("forward_kl"),
               "fused jsd": fused("jsd")}
    for name, fn in methods.items():
        row, others_per_call = profile_gemms(fn)
        other: dict[str, list[float]] = defaultdict(list)
        for others in others_per_call:
            kinds = defaultdict(float)
            for kname, ms in others:
                kinds["triton " + kname[:40] if "kernel" in kname or "triton" in kname else "other"] += ms
            for k, ms in kinds.items():
                other[k].append(ms)
        row["other_kernels_ms"] = {k: round(statistics.median(v), 4) for k, v in other.items()}
        out["runs"][name] = row
        print(name, json.dumps(row), flush=True)
    # timing with and without the host ahead, methods interleaved round by round
    timings: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in methods}
    for m in ("fused forward_kl", "fused jsd"):
        methods[m + " (forward only)"] = fused(m.split()[-1], backward=False)
        timings[m + " (forward only)"] = defaultdict(list)
    for _ in range(ROUNDS):
        for name, fn in methods.items():
            plain, _ = event_ms(fn, 0)
            short, _ = event_ms(fn, SHORT_SLEEP_CYCLES)
            ahead, host = event_ms(fn, SLEEP_CYCLES)
            timings[name]["plain_ms"].append(plain)
            timings[name]["short_sleep_ms"].append(short)
            timings[name]["host_ahead_ms"].append(ahead)
            timings[name]["host_ms"].append(host)
    out["event_timings"] = {
        name: {k: round(statistics.median(v), 4) for k, v in t.items()} | {"rounds": ROUNDS}
        for name, t in timings.items()
    }
    print("\nmedian ms over rounds: plain events | after a ~2 ms sleep | after a ~30 ms sleep | host ms of the call")
    for name, t in out["event_timings"].items():
        print(f"{name:34s} {t['plain_ms']:8.3f} | {t['short_sleep_ms']:8.3f} | {t['host_ahead_ms']:8.3f} |"
              f" {t['host_ms']:8.3f}")
    for m in ("floor", "fused forward_kl", "fused jsd"):
        for rep in range(2):
            g = gaps(methods[m])
            out.setdefault("gaps", {}).setdefault(m, []).append(g)
            print(f"\ngaps {m} #{rep}: kernels {g['kernels']}, span {g['span_ms']} ms, idle {g['idle_ms']} ms")
            for x in g["largest"][:8]:
                print("   ", x)
    for m in ("fused forward_kl (forward only)",):
        for rep in range(2):
            tl_ = host_timeline(methods[m])
            out.setdefault("host_timeline", []).append(tl_)
            print(f"\nhost timeline #{rep}, {m}:")
            for x in tl_:
                print("   ", x)
        report = host_profile(methods[m], calls=1, top=45, sort="cumulative", sleep=False)
        out["host_profile " + m] = report
        print(f"\nhost profile, {m}, one call, GPU idle at the start:\n" + "\n".join(report.splitlines()[:60]))
    for what, fn in (("torch.cuda.mem_get_info", lambda: torch.cuda.mem_get_info(dev)),
                     ("plan_chunks", lambda: plan_chunks(T, V, H_S, 2, dev))):
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        print(f"{what}: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms per call", flush=True)
    methods = {m: f for m, f in methods.items() if "forward only" not in m}
    print("\nGEMM ms by label (floor | chunk GEMMs alone | fused forward_kl | fused jsd)")
    for lab in LABELS:
        print(f"{lab:16s}", " | ".join(f"{out['runs'][m]['gemm_ms'].get(lab, float('nan')):8.3f}" for m in methods))
    print(f"{'GEMM total':16s}", " | ".join(f"{out['runs'][m]['gemm_total_ms']:8.3f}" for m in methods))
    print(f"{'wall':16s}", " | ".join(f"{out['runs'][m]['wall_ms']:8.3f}" for m in methods))
    write_device_record(out, "loop_profile", args.outdir, args.tag)


if __name__ == "__main__":
    main()
