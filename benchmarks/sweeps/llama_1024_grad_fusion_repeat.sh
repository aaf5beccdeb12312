#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, micro-batch 4,
# fused SwiGLU: the output layer's gradient-accumulation fusion on / off with 10 timed
# iterations each (single iterations vary by up to 10%), for the memory-target configuration
# (precision-aware optimizer, bf16 state, --recompute-modules swiglu) and for Megatron's optimizer
# (fp32 main_grad: the fusion's addmm then reads and writes an fp32 [V, h] buffer per chunk);
# the Hugging Face / TRL-style step at batch 1 in the same call. Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_grad_fusion_repeat.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e pa_swiglu_fusion $low --micro-batch-size 4 --recompute-modules swiglu --iters 10 --warmup 2
e2e pa_swiglu_nofusion $low --micro-batch-size 4 --recompute-modules swiglu --iters 10 --warmup 2 \
    --no-output-layer-grad-accumulation-fusion
e2e megatron_fusion --micro-batch-size 4 --iters 10 --warmup 2
e2e megatron_nofusion --micro-batch-size 4 --iters 10 --warmup 2 --no-output-layer-grad-accumulation-fusion
hf_baseline 20 3
tar czf "$out.tgz" -C "$out" .
