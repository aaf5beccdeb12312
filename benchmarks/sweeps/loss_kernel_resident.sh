#!/usr/bin/env bash
# The fused loss's "resident" single-pass kernel (each program's vocab segment held in
# registers, one DRAM read of both logits and one write of dz per chunk) on one GPU: the
# single-pass GPU tests of every variant, the kernel sweep (1024 / 512-row chunks of
# V = 151936, 10 back-to-back launches per timing), then both benchmark cases with the chunking
# sweep, floor and every variant timed in interleaved rounds. Packs everything into OUTDIR.tgz.
# Usage (GPU machine, repository root): bash benchmarks/sweeps/loss_kernel_resident.sh OUTDIR [ROUNDS]
set -u
out=${1:?output directory}
rounds=${2:-15}
mkdir -p "$out"
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$out/gpu_state_start.csv"
timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu/test_fused_gpu.py -k single_pass > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$? $(tail -1 "$out/gpu_tests.log")"
timeout 400 python benchmarks/loss_kernel.py --kernel-sweep --sweep --interleave "$rounds" --no-reference \
    --out "$out" --tag resident > "$out/loss_kernel.log" 2>&1
echo "loss_kernel rc=$?"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$out/gpu_state_end.csv"
grep -E "^  " "$out/loss_kernel.log" | tail -70
tar czf "$out.tgz" -C "$out" .
