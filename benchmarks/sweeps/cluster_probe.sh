#!/usr/bin/env bash
# On a lent GPU (carry .whl): builds of the cluster single-pass kernel side by side
# (benchmarks/cluster_probe.py, NOTES_loss_kernel.md iteration 16): the cluster GPU tests, the
# checked and interleaved timings of each build against the Triton single pass, and Nsight
# Compute's scheduler / warp-state / memory sections for three builds. Logs and results in $OUT.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader
python -c "import torch,triton;print(torch.__version__, torch.version.cuda, triton.__version__)"
timeout 120 python -m pytest tests/gpu/test_fused_gpu.py -q -x -k "cluster" > $OUT/gpu_tests_cluster.log 2>&1; tail -2 $OUT/gpu_tests_cluster.log
BUILDS=${BUILDS:-"c8t512 c8t256 c8t256o c8t256or c8t256ou2 c8t256s1m2 c8t512s1m2 c16t256m2 c16t256m2o c16t256m2or c16t512m2 c16t256s1m4 c16t128s1m4"}
timeout 300 python benchmarks/cluster_probe.py --builds $BUILDS --vocab 151936 128256 --rounds 5 --out $OUT > $OUT/probe.log 2>&1
grep -E "^check" $OUT/probe.log | grep -v "'ok': True" | cut -c1-250; sed -n '/^kind /,$p' $OUT/probe.log
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for b in ${NCU_BUILDS:-c8t256 c16t256m2or c8t256s1m2}; do
  [ -n "$NCU" ] || { echo "no ncu"; break; }
  timeout 90 $NCU -k distill_cluster_single_pass --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
    python benchmarks/cluster_probe.py --builds $b --kinds forward_kl --profile > $OUT/ncu_$b.log 2>&1
  echo "== ncu $b"; grep -E "Duration|DRAM Throughput|Issue Slots Busy|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occupancy|Eligible Warps|Registers Per|Cluster Size|Waves" $OUT/ncu_$b.log | sed 's/  */ /g' | head -14
  grep -E "stalled|spends" $OUT/ncu_$b.log | cut -c1-400 | head -3
done
