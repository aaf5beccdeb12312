#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, precision-aware
# optimizer with bf16 state and the fused SwiGLU: --recompute-modules (swiglu, layernorm, both)
# against keeping everything, at micro-batch 4 (and 2), with the Hugging Face / TRL-style step at
# batch 1 in the same call (the memory target; 20 timed steps: with 3 its tokens/s moved by 35%
# between calls). Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_recompute_memory.sh OUTDIR
set -u
out=${1:?output directory}
mkdir -p "$out"
source benchmarks/device_setup.sh
e2e() {  # name, e2e.py flags...
    local name=$1; shift
    timeout 150 torchrun --standalone --nproc-per-node 1 benchmarks/e2e.py --preset llama-1b_from_8b \
        --modes distill --kd-loss jsd --kd-loss-impl fused --seq-length 1024 --global-batch-size 32 \
        --iters 3 --warmup 1 --use-precision-aware-optimizer --main-grads-dtype bf16 --exp-avg-dtype bf16 \
        --exp-avg-sq-dtype bf16 --out "$out/e2e_$name.json" "$@" > "$out/e2e_$name.log" 2>&1
    echo "$name rc=$? $(grep '^| distill' "$out/e2e_$name.log")"
}
e2e mb4_keep --micro-batch-size 4
e2e mb4_swiglu --micro-batch-size 4 --recompute-modules swiglu
e2e mb4_both --micro-batch-size 4 --recompute-modules swiglu layernorm
e2e mb2_both --micro-batch-size 2 --recompute-modules swiglu layernorm
timeout 150 python benchmarks/hf_gkd_baseline.py --preset llama-1b_from_8b --batch 1 --seq-length 1024 \
    --iters 20 --warmup 3 --out "$out/hf_baseline_b1.json" > "$out/hf_baseline_b1.log" 2>&1
echo "hf_baseline_b1 rc=$? $(grep '"distill"' "$out/hf_baseline_b1.log" | tr '\n' ' ')"
tar czf "$out.tgz" -C "$out" .
