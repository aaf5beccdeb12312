"""Two versions of cluster_single_pass.cu side by side on cluster_probe.check's logits (a GPU).

For each version (``--before`` a file, then the source as it is), each build and kind, the
largest loss and dz errors against float64 over three seeds, next to the multi-pass Triton
kernels' errors on the same logits, for independent N(0, 9) logits and LLM-sized ones where
teacher and student mostly agree (``cluster_probe.check_logits``). Written for the change of
FAST_STATS' bases (NOTES_loss_kernel.md, iteration 22):

    git show d47847a:megatron_distill/losses/kernels/cluster_single_pass.cu > /tmp/before.cu
    python benchmarks/sweeps/cluster_source_check.py --before /tmp/before.cu \\
        --builds c8t128s1m2abnf c8t128s1m2hqanf --builds-now c8t128s1m2hqanfe --builds-before c8t128s1m2hqa
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cluster_probe as cp  # noqa: E402

from megatron_distill.losses.kernels import cluster_single_pass as cluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other version of cluster_single_pass.cu")
    parser.add_argument("--builds", nargs="+", default=["c8t128s1m2abnf"], help="builds run with both versions")
    parser.add_argument("--builds-before", nargs="*", default=[], help="builds run with --before only")
    parser.add_argument("--builds-now", nargs="*", default=[], help="builds run with the source as it is only")
    parser.add_argument("--vocab", nargs="+", type=int, default=[32000, 151936])
    args = parser.parse_args()
    if not args.before.is_file():
        raise SystemExit(f"--before: no file {args.before}")
    now = cluster._SOURCE
    for label, source, only in (("before", args.before.resolve(), args.builds_before), ("now", now, args.builds_now)):
        cluster._SOURCE = source
        cluster._compiled.clear()
        for name in args.builds + only:
            for kind in ("forward_kl", "reverse_kl", "jsd"):
                for v in args.vocab:
                    for llm in (False, True):
                        errs = [cp.check(cluster.parse_build(name), kind, 300, v, seed, llm) for seed in range(3)]
                        worst = {key: max(e[key] for e in errs) for key in (
                            "loss_err_vs_fp64", "multi_pass_loss_err_vs_fp64", "dz_err_vs_fp64",
                            "multi_pass_dz_err_vs_fp64")}
                        print(label, name, kind, v, "llm_like" if llm else "randn",
                              f"loss64 max {worst['loss_err_vs_fp64']:.2e} "
                              f"(multi-pass {worst['multi_pass_loss_err_vs_fp64']:.2e})",
                              f"dz64 {worst['dz_err_vs_fp64']:.4e} "
                              f"(multi-pass {worst['multi_pass_dz_err_vs_fp64']:.4e})",
                              "ok", all(e["ok"] for e in errs), flush=True)


if __name__ == "__main__":
    main()
