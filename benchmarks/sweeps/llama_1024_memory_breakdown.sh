#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, precision-aware
# optimizer with bf16 state, micro-batch 4: what is allocated at the iteration's memory peak, by
# the line that allocated it (e2e.py --memory-breakdown), keeping everything and with
# --recompute-modules swiglu. Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_memory_breakdown.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e mb4_keep_breakdown $low --micro-batch-size 4 --memory-breakdown --iters 1
e2e mb4_swiglu_breakdown $low --micro-batch-size 4 --recompute-modules swiglu --memory-breakdown --iters 1
tar czf "$out.tgz" -C "$out" .
