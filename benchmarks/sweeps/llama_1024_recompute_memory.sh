#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, precision-aware
# optimizer with bf16 state and the fused SwiGLU: --recompute-modules (swiglu, layernorm, both)
# against keeping everything, at micro-batch 4 (and 2), with the Hugging Face / TRL-style step at
# batch 1 in the same call (the memory target; 20 timed steps: with 3 its tokens/s moved by 35%
# between calls). Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_recompute_memory.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e mb4_keep $low --micro-batch-size 4
e2e mb4_swiglu $low --micro-batch-size 4 --recompute-modules swiglu
e2e mb4_both $low --micro-batch-size 4 --recompute-modules swiglu layernorm
e2e mb2_both $low --micro-batch-size 2 --recompute-modules swiglu layernorm
hf_baseline 20 3
tar czf "$out.tgz" -C "$out" .
