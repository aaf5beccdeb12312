#!/usr/bin/env bash
# On a lent GPU (carry .whl): builds of the cluster single-pass kernel side by side
# (benchmarks/cluster_probe.py, NOTES_loss_kernel.md iteration 16): the cluster GPU tests, the
# checked and interleaved timings of each build against the Triton single pass, case 1 end to end
# with the fastest build per kind group against the committed defaults (loss_kernel.py --cluster-builds), the
# fused-loss GPU tests with those builds as the single pass where they beat it, and Nsight Compute with
# the warps' stall reasons on NCU_BUILDS (build[:kind] each, kind forward_kl unless named; default c8t256).
# Logs and results in $OUT.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader
python -c "import torch,triton;print(torch.__version__, torch.version.cuda, triton.__version__)"
timeout 150 python -m pytest tests/gpu/test_fused_gpu.py -q -x -k "cluster" > $OUT/gpu_tests_cluster.log 2>&1; tail -2 $OUT/gpu_tests_cluster.log
BUILDS=${BUILDS:-"c8t512 c8t256 c8t256o c8t256or c8t256ou2 c8t256s1m2 c8t512s1m2 c16t256m2 c16t256m2o c16t256m2or c16t512m2 c16t256s1m4 c16t128s1m4"}
timeout 300 python benchmarks/cluster_probe.py --builds $BUILDS --vocab ${VOCABS:-151936 128256} --rounds 5 --out $OUT > $OUT/probe.log 2>&1
grep -E "^check" $OUT/probe.log | grep -v "'ok': True" | cut -c1-250; sed -n '/^kind /,$p' $OUT/probe.log
SEL=$(python - "$OUT" <<'PY'
import json, pathlib, sys
rows = json.loads(next(pathlib.Path(sys.argv[1]).glob("cluster_probe_*.json")).read_text())["timings"]
best = {}
for r in rows:
    if r["vocab"] == 151936 and r["build"] != "reread":
        g = "jsd" if r["kind"] == "jsd" else "kl"
        best[g] = min(best.get(g, (1e9, "")), (r["ms"], r["build"]))
base = {("jsd" if r["kind"] == "jsd" else "kl"): r["ms"] for r in rows if r["vocab"] == 151936 and r["build"] == "reread"}
faster = all(best[g][0] < base[g] for g in best)
print(",".join(f"{g}:{b}" for g, (_, b) in sorted(best.items())), "faster" if faster else "slower")

PY
)
echo "fastest builds: $SEL"; SPEED=${SEL#* }; SEL=${SEL% *}
# the fastest builds against the committed defaults (the plain "fused" rows), in the same shuffled rounds
timeout 200 python benchmarks/loss_kernel.py --cases ${E2E_CASES:-T8k_V152k} --interleave ${E2E_ROUNDS:-16} --no-reference --no-liger --cluster-builds $SEL --tag cluster_e2e_best --out $OUT > $OUT/e2e_best.log 2>&1; grep -E "^\| (fused|floor)" $OUT/e2e_best.log | cut -c1-200
# where the fastest builds beat the Triton single pass: the fused-loss GPU tests with them as the single pass
if [ "$SPEED" = faster ] && [ "${ALL_TESTS:-1}" = 1 ]; then
  MEGATRON_DISTILL_SP_VARIANT=cluster MEGATRON_DISTILL_CLUSTER_BUILD=$SEL timeout 300 python -m pytest tests/gpu/test_fused_gpu.py -q > $OUT/gpu_tests_all_cluster.log 2>&1; tail -2 $OUT/gpu_tests_all_cluster.log
fi
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for spec in ${NCU_BUILDS-c8t256}; do
  b=${spec%%:*}; k=${spec#*:}; [ "$k" = "$spec" ] && k=forward_kl
  [ -n "$NCU" ] || { echo "no ncu"; break; }
  timeout 60 $NCU -k distill_cluster_single_pass --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    python benchmarks/cluster_probe.py --builds $b --kinds $k --profile > $OUT/ncu_${b}_$k.log 2>&1
  echo "== ncu $b $k"; grep -E "Duration|DRAM Throughput|Issue Slots Busy|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occupancy|Eligible Warps|Registers Per|Cluster Size|Waves" $OUT/ncu_${b}_$k.log | sed 's/  */ /g' | head -14
  grep -E "stalled|spends" $OUT/ncu_${b}_$k.log | cut -c1-400 | head -3
  # the largest stall reasons, in warp cycles per issued instruction
  grep -E "smsp__average_warps_issue_stalled_" $OUT/ncu_${b}_$k.log | awk '{print $NF, $1}' | sort -rn | head -8
done
