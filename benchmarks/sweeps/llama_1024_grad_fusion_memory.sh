#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, precision-aware
# optimizer with bf16 state, micro-batch 4: the output layer's weight gradient added straight into
# main_grad (--output-layer-grad-accumulation-fusion, the default) against holding it until
# backward, with --recompute-modules swiglu and with nothing recomputed; the Hugging Face /
# TRL-style step at batch 1 in the same call; first the GPU tests of the fused loss.
# Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_grad_fusion_memory.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_fused_gpu.py -k "weight_grad_into" \
    > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$? $(tail -1 "$out/gpu_tests.log")"
e2e mb4_swiglu_fusion $low --micro-batch-size 4 --recompute-modules swiglu
e2e mb4_swiglu_nofusion $low --micro-batch-size 4 --recompute-modules swiglu --no-output-layer-grad-accumulation-fusion
e2e mb4_keep_fusion $low --micro-batch-size 4
e2e mb4_both_fusion $low --micro-batch-size 4 --recompute-modules swiglu layernorm
hf_baseline 20 3
tar czf "$out.tgz" -C "$out" .
