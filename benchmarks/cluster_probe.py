"""Builds of the cluster single-pass kernel (cluster_single_pass.cu) side by side on one GPU.

Builds are named as ``cluster_single_pass.parse_build`` reads them, e.g. ``c16t256m2or`` or
``c8t128s1m2h``; ``cluster_single_pass.Build`` says what each part sets. Every build is first
checked against the multi-pass Triton kernels on fresh random logits, independent N(0, 9) and
LLM-sized ones where teacher and student mostly agree (loss partial sums rtol 1e-5, dz within one
bf16 rounding; both kernels' loss and dz errors against float64 are reported), then all builds and the
Triton single pass ("reread", its defaults) are timed in shuffled interleaved rounds. As in
``loss_kernel.py --kernel-sweep``, the timed launches run back to back over one buffer, so after
the first one z_S holds dz (the same work: no branch depends on the values).

    python benchmarks/cluster_probe.py --builds c8t512 c8t256 c16t256m2 --rounds 7 --out $OUT
    ncu ... python benchmarks/cluster_probe.py --builds c8t256 --profile   # a few launches, no timing
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_kernel import LAUNCHES, environment, multi_pass_step, timed  # noqa: E402

from megatron_distill.losses.kernels import cluster_single_pass as cluster  # noqa: E402
from megatron_distill.losses.kernels import distill_elementwise as ew  # noqa: E402
from megatron_distill.losses.reference import distill_loss_per_token  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_logits(rows: int, v: int, seed: int, llm_like: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 student and teacher logits ``[rows, V]``: independent N(0, 9), or (``llm_like``) of an
    LLM's size (N(25, 36), maxima near 50) with the teacher equal to the student in 90% of the
    vocabulary, where the loss and dz are small and a build's own errors show."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if not llm_like:
        zs = (torch.randn(rows, v, generator=g, device="cuda") * 3).to(torch.bfloat16)
        return zs, (torch.randn(rows, v, generator=g, device="cuda") * 3).to(torch.bfloat16)
    zs = (torch.randn(rows, v, generator=g, device="cuda") * 6 + 25).to(torch.bfloat16)
    differs = torch.rand(rows, v, generator=g, device="cuda") < 0.1
    return zs, (zs.float() + torch.randn(rows, v, generator=g, device="cuda") * differs).to(torch.bfloat16)


def check(build: cluster.Build, kind: str, rows: int, v: int, seed: int, llm_like: bool = False) -> dict:
    """The build against the multi-pass kernels on fresh logits (``check_logits``): loss error and
    dz error, and both kernels' errors against float64."""
    zs0, zt = check_logits(rows, v, seed, llm_like)
    a, b = zs0.clone(), zs0.clone()
    loss_a = torch.full((build.cluster, rows), float("nan"), device="cuda")
    cluster.loss_grad_(a, zt, loss_a, kind=kind, beta=0.3, scale2=ew.LOG2E / 1.3, grad_scale=0.01 / 1.3, build=build)
    split = ew.default_split(rows, v, b.device)
    loss_b = torch.empty(split, rows, device="cuda")
    multi_pass_step(b, zt, loss_b, kind, split, beta=0.3, temperature=1.3, grad_scale=0.01)
    la, lb = loss_a.sum(0), loss_b.sum(0)
    loss_err = ((la - lb).abs() - 1e-5 * lb.abs()).max().item()  # as assert_close(rtol=1e-5, atol=1e-6)
    ok = bool(torch.isfinite(la).all()) and loss_err <= 1e-6 and _rel(a, b) <= 8e-3
    # both against the float64 gradient of the same bf16 logits: the bf16 rounding of dz is common
    # to both, so a build's own error shows as the difference between the two
    z64 = zs0.double().requires_grad_()
    per_token = distill_loss_per_token(z64, zt.double(), kind, beta=0.3, temperature=1.3)
    exact = torch.autograd.grad(per_token.sum() * 0.01, z64)[0]
    loss64 = per_token.detach()
    return dict(logits="llm_like" if llm_like else "randn", loss_excess=loss_err, dz_rel_err=_rel(a, b),
                dz_err_vs_fp64=_rel(a, exact), multi_pass_dz_err_vs_fp64=_rel(b, exact),
                loss_err_vs_fp64=(la.double() - loss64).abs().max().item(),
                multi_pass_loss_err_vs_fp64=(lb.double() - loss64).abs().max().item(), ok=ok)


def launcher(kind: str, build: cluster.Build | None, zs: torch.Tensor, zt: torch.Tensor):
    """One launch over ``zs`` / ``zt`` ``[rows, V]``: the build, or the Triton single pass (None)."""
    rows, v = zs.shape
    if build is None:
        loss = torch.empty(ew.single_pass_split(v, zs.device, kind=kind, variant="reread"), rows, device="cuda")
        return lambda: ew.single_pass_loss_grad_(zs, zt, loss, kind=kind, beta=0.5, temperature=1.0,
                                                 grad_scale=1e-4, variant="reread")
    loss = torch.empty(build.cluster, rows, device="cuda")
    return lambda: cluster.loss_grad_(zs, zt, loss, kind=kind, beta=0.5, scale2=ew.LOG2E, grad_scale=1e-4, build=build)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", nargs="+", default=["c8t512", "c8t256"])
    parser.add_argument("--kinds", nargs="+", default=["forward_kl", "jsd"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[151936])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="a few launches of each build, no timing (for ncu)")
    parser.add_argument("--lineinfo", action="store_true", help="compile with line information (ncu's source page)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.lineinfo:
        cluster.EXTRA_NVRTC_OPTIONS.append("-lineinfo")
    try:
        builds = {name: cluster.parse_build(name) for name in args.builds}
    except ValueError as exc:
        raise SystemExit(f"--builds: {exc}") from None
    report = dict(date=str(date.today()), command="python " + " ".join(sys.argv), env=environment(1),
                  rows=args.rows, launches_per_timing=LAUNCHES, checks=[], timings=[])
    for v in args.vocab:
        unit = args.rows * v * 2
        g = torch.Generator(device="cuda").manual_seed(1)
        zs0 = torch.randn(args.rows, v, device="cuda", generator=g).mul_(2).to(torch.bfloat16)
        zt = torch.randn(args.rows, v, device="cuda", generator=g).mul_(2).to(torch.bfloat16)
        zs = zs0.clone()
        for kind in args.kinds:
            fns = {}
            if not args.profile:
                fns["reread"] = launcher(kind, None, zs, zt)
            for name, b in builds.items():
                cluster._failed.clear()  # one refused build must not turn the others off
                ok = True
                for llm_like in (False, True):
                    try:
                        res = check(b, kind, 300, v, seed=len(report["checks"]), llm_like=llm_like)
                    except Exception as exc:
                        res = dict(ok=False, error=repr(exc)[:300])
                    report["checks"].append(dict(build=name, kind=kind, vocab=v, **res))
                    print(f"check {kind:<10} V={v} {name:<14} {res}", flush=True)
                    ok = ok and res["ok"]
                if not ok:
                    continue
                fns[name] = launcher(kind, b, zs, zt)
            if args.profile:
                for fn in fns.values():
                    for _ in range(3):
                        fn()
                torch.cuda.synchronize()
                continue
            times = {name: [] for name in fns}
            zs.copy_(zs0)
            for fn in fns.values():  # compile, warm up
                fn()
            for _ in range(args.rounds):
                order = list(fns)
                random.shuffle(order)
                for name in order:
                    def many(fn=fns[name]):
                        for _ in range(LAUNCHES):
                            fn()
                    times[name] += [t / LAUNCHES for t in timed(many, 3, 1)]
            base = statistics.median(times["reread"])
            for name, ts in times.items():
                med = statistics.median(ts)
                row = dict(kind=kind, vocab=v, build=name, ms=round(med, 4), ms_all=[round(t, 4) for t in ts],
                           gbps_3units=round(3 * unit / med / 1e6, 1), x_reread=round(med / base, 3))
                if name in builds:
                    smem = cluster.shared_bytes(v, builds[name])
                    kern = cluster._compile(zs.device, kind, builds[name])
                    row["active_clusters"] = cluster.active_clusters(kern, zs.device, smem, builds[name])
                report["timings"].append(row)
    if args.profile:
        return
    print(f"\n{'kind':<10} {'V':>7} {'build':<14} {'ms':>8} {'GB/s':>7} {'x reread':>8} clusters")
    for r in report["timings"]:
        print(f"{r['kind']:<10} {r['vocab']:>7} {r['build']:<14} {r['ms']:>8.4f} {r['gbps_3units']:>7.1f} "
              f"{r['x_reread']:>8.3f} {r.get('active_clusters', '')}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")
        path = args.out / f"cluster_probe_{name}_{report['date']}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
