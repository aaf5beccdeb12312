#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU: peak memory and
# throughput with Megatron's mixed-precision optimizer and with --use-precision-aware-optimizer,
# side by side in one call, plus the Hugging Face / TRL-style step at batch 1 for the memory target.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_optimizer_memory.sh OUTDIR
# (everything is also packed into OUTDIR/sweep.tgz: the device tool brings back at most 8 files)
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e megatron_mb4 --micro-batch-size 4
e2e megatron_mb8 --micro-batch-size 8
e2e pa_bf16_mb1 --micro-batch-size 1 $low
e2e pa_bf16_mb4 --micro-batch-size 4 $low
e2e pa_bf16_mb8 --micro-batch-size 8 $low
e2e pa_fp32grads_mb4 --micro-batch-size 4 $mixed
hf_baseline 3 1
tar czf "$out/sweep.tgz" -C "$out" --exclude sweep.tgz .
