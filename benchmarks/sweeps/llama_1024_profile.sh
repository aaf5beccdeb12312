#!/usr/bin/env bash
# Shape (b) (Llama-1B-shaped student <- 8B-shaped teacher), seq 1024, one GPU, micro-batch 4,
# precision-aware optimizer with bf16 state, fused SwiGLU, --recompute-modules swiglu: where the
# iteration's GPU time goes (e2e.py --profile: GPU busy / idle, kernel time by kind) with Python's
# garbage collector as usual and with it run only between iterations (--manual-gc), 10 timed
# iterations each; the teacher's forward alone, profiled. Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/llama_1024_profile.sh OUTDIR
set -u
out=${1:?output directory}
source benchmarks/sweeps/llama_1024_common.sh
e2e gc_auto $low --micro-batch-size 4 --recompute-modules swiglu --iters 10 --warmup 2 --profile
e2e gc_manual $low --micro-batch-size 4 --recompute-modules swiglu --iters 10 --warmup 2 --profile --manual-gc
e2e teacher_fwd $low --micro-batch-size 4 --modes teacher_fwd --iters 3 --warmup 1 --profile
for f in "$out"/e2e_*.log; do echo "== $f"; grep -A30 "^wall" "$f" | head -32; done
tar czf "$out.tgz" -C "$out" .
