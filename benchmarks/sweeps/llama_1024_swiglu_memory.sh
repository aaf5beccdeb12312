#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU: the fused SwiGLU
# (on by default on CUDA) against --no-bias-swiglu-fusion, with Megatron's optimizer and with the
# precision-aware one (bf16 gradients and moments), at micro-batches 1, 2, 4; the Hugging Face /
# TRL-style step at batch 1 in the same call (the memory target). Packs everything into
# OUTDIR/sweep.tgz (the device tool brings back at most 8 files).
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_swiglu_memory.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e pa_bf16_mb4_unfused --micro-batch-size 4 $low --no-bias-swiglu-fusion
e2e pa_bf16_mb4 --micro-batch-size 4 $low
e2e pa_bf16_mb2 --micro-batch-size 2 $low
e2e pa_bf16_mb1 --micro-batch-size 1 $low
e2e megatron_mb4 --micro-batch-size 4
hf_baseline 3 1
tar czf "$out/sweep.tgz" -C "$out" --exclude sweep.tgz .
