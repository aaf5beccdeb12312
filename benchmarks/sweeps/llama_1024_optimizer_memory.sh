#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU: peak memory and
# throughput with Megatron's mixed-precision optimizer and with --use-precision-aware-optimizer,
# side by side in one call, plus the Hugging Face / TRL-style step at batch 1 for the memory target.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_optimizer_memory.sh OUTDIR
# (everything is also packed into OUTDIR/sweep.tgz: the device tool brings back at most 8 files)
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
mixed="--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16"
e2e megatron_mb4 --micro-batch-size 4
e2e megatron_mb8 --micro-batch-size 8
e2e pa_bf16_mb1 --micro-batch-size 1 $low
e2e pa_bf16_mb4 --micro-batch-size 4 $low
e2e pa_bf16_mb8 --micro-batch-size 8 $low
e2e pa_fp32grads_mb4 --micro-batch-size 4 $mixed
timeout 120 python benchmarks/hf_gkd_baseline.py --preset llama-1b_from_8b --batch 1 --seq-length 1024 \
    --iters 3 --warmup 1 --out "$out/hf_baseline_b1.json" > "$out/hf_baseline_b1.log" 2>&1
echo "hf_baseline_b1 rc=$? $(tail -3 "$out/hf_baseline_b1.log" | tr '\n' ' ')"
tar czf "$out/sweep.tgz" -C "$out" --exclude sweep.tgz .
