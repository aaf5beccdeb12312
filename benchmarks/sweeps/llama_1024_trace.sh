#!/usr/bin/env bash
# Shape (b), seq 1024, one GPU, micro-batch 4, global batch 16, PA with bf16 state, fused SwiGLU,
# --recompute-modules swiglu: one iteration as a Chrome trace (CPU and CUDA activity) to find
# what the host does while the GPU idles (15% of the iteration in llama_1024_profile.sh).
# The trace is split into <= 15 MB parts (the device tool's file limit); join them with cat.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_trace.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e trace $low --micro-batch-size 4 --recompute-modules swiglu --global-batch-size 16 --iters 2 --warmup 2 \
    --trace "$out"
ls -la "$out"
split -b 15M "$out/trace_distill.json.gz" "$out/trace_distill.json.gz.part-" && rm "$out/trace_distill.json.gz"
