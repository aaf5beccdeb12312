#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, micro-batch 4,
# precision-aware optimizer with bf16 state, fused SwiGLU, gradient-accumulation fusion: RoPE in one
# Triton kernel each way (--rope-fusion, the default) against Megatron's unfused RoPE
# (--no-rope-fusion), 10 timed iterations each, with --recompute-modules swiglu (the memory target's
# configuration) and without recompute; one more iteration of each profiled (GPU busy / idle);
# the Hugging Face / TRL-style step at batch 1 in the same call; first the kernel's GPU test.
# Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_rope_fusion.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
timeout 120 python -m pytest -q -s -p no:cacheprovider tests/gpu/test_rope_fusion_gpu.py > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$? $(tail -1 "$out/gpu_tests.log")"
common="$low --micro-batch-size 4 --iters 10 --warmup 2 --profile"
e2e swiglu_rope $common --recompute-modules swiglu
e2e swiglu_norope $common --recompute-modules swiglu --no-rope-fusion
e2e keep_rope $common
hf_baseline 20 3
for f in "$out"/e2e_*.log; do echo "== $f"; grep "^wall\|final\|iter 12" "$f"; done
tar czf "$out.tgz" -C "$out" .
