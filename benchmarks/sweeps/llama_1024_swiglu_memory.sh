#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU: the fused SwiGLU
# (on by default on CUDA) against --no-bias-swiglu-fusion, with Megatron's optimizer and with the
# precision-aware one (bf16 gradients and moments), at micro-batches 1, 2, 4; the Hugging Face /
# TRL-style step at batch 1 in the same call (the memory target). Packs everything into
# OUTDIR/sweep.tgz (the device tool brings back at most 8 files).
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_swiglu_memory.sh OUTDIR
set -u
out=${1:?output directory}
mkdir -p "$out"
source benchmarks/device_setup.sh
e2e() {  # name, e2e.py flags...
    local name=$1; shift
    timeout 150 torchrun --standalone --nproc-per-node 1 benchmarks/e2e.py --preset llama-1b_from_8b \
        --modes distill --kd-loss jsd --kd-loss-impl fused --seq-length 1024 --global-batch-size 32 \
        --iters 3 --warmup 1 --out "$out/e2e_$name.json" "$@" > "$out/e2e_$name.log" 2>&1
    echo "$name rc=$? $(grep '^| distill' "$out/e2e_$name.log")"
}
low="--use-precision-aware-optimizer --main-grads-dtype bf16 --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16"
e2e pa_bf16_mb4_unfused --micro-batch-size 4 $low --no-bias-swiglu-fusion
e2e pa_bf16_mb4 --micro-batch-size 4 $low
e2e pa_bf16_mb2 --micro-batch-size 2 $low
e2e pa_bf16_mb1 --micro-batch-size 1 $low
e2e megatron_mb4 --micro-batch-size 4
timeout 120 python benchmarks/hf_gkd_baseline.py --preset llama-1b_from_8b --batch 1 --seq-length 1024 \
    --iters 3 --warmup 1 --out "$out/hf_baseline_b1.json" > "$out/hf_baseline_b1.log" 2>&1
echo "hf_baseline_b1 rc=$? $(grep '"distill"' "$out/hf_baseline_b1.log" | tr '\n' ' ')"
tar czf "$out/sweep.tgz" -C "$out" --exclude sweep.tgz .
