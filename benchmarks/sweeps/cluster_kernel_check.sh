#!/usr/bin/env bash
# On a lent GPU (carry .whl): the cluster single-pass kernel (NOTES_loss_kernel.md iteration 15):
# its GPU tests, the kernel sweep against the Triton single pass, and the fused loss end to end
# with the cluster kernel as a --sweep row beside the default, in shuffled interleaved rounds.
# Writes logs and results under $OUT.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
python -c "import torch,triton;print(torch.__version__, torch.version.cuda, triton.__version__)"
timeout 150 python -m pytest tests/gpu/test_fused_gpu.py -q -x -k "cluster" > $OUT/gpu_tests_cluster.log 2>&1; tail -5 $OUT/gpu_tests_cluster.log
timeout 90 python benchmarks/loss_kernel.py --kernel-sweep --cases --no-reference --no-liger --tag cluster_sweep --out $OUT > $OUT/sweep.log 2>&1; grep -E "rows=" $OUT/sweep.log | grep -E "cluster|reread', 'block_v': (2048|1024), 'num_warps': 4, 'num_stages': 3, 'programs_per_sm': (4|8), 'segments': 1[56]" | cut -c1-200
timeout 200 python benchmarks/loss_kernel.py --cases T8k_V152k --sweep --interleave 10 --no-reference --tag cluster_e2e --out $OUT > $OUT/e2e.log 2>&1; tail -40 $OUT/e2e.log | cut -c1-220
