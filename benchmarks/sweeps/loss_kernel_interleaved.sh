#!/usr/bin/env bash
# Both loss-kernel benchmark cases on one GPU with the chunking sweep, the floor and every fused
# variant timed in ROUNDS interleaved rounds (per-round ratios to the floor of the same round),
# one profiled call of each (GEMM / Triton / other kernel time, GPU idle), Liger-Kernel's
# LigerFusedLinearJSD beside them. Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/loss_kernel_interleaved.sh OUTDIR [ROUNDS]
set -u
out=${1:?output directory}
rounds=${2:-40}
mkdir -p "$out"
source benchmarks/device_setup.sh
state() { nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$out/gpu_state_$1.csv"; }
state start
timeout 500 python benchmarks/loss_kernel.py --sweep --interleave "$rounds" --breakdown --no-reference \
    --out "$out" --tag interleaved > "$out/loss_kernel.log" 2>&1
echo "loss_kernel rc=$?"
state end
grep -E "^  " "$out/loss_kernel.log" | grep -v "breakdown" | tail -40
grep -A12 "Kernel time of one profiled call" "$out"/*.md | tail -30
tar czf "$out.tgz" -C "$out" .
