# Sourced by the llama_1024_*.sh sweeps (repository root, $out set): installs the carried wheels
# and defines the e2e run of shape (b) (Llama-1B-shaped student <- 8B-shaped teacher) at seq 1024
# on one GPU, and the Hugging Face / TRL-style baseline step at batch 1.
mkdir -p "$out"
source benchmarks/device_setup.sh
low="--use-precision-aware-optimizer --main-grads-dtype bf16 --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16"
mixed="--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16"
e2e() {  # name, e2e.py flags...: $out/e2e_<name>.json and .log, and its table row on stdout
    local name=$1; shift
    timeout 150 torchrun --standalone --nproc-per-node 1 benchmarks/e2e.py --preset llama-1b_from_8b \
        --modes distill --kd-loss jsd --kd-loss-impl fused --seq-length 1024 --global-batch-size 32 \
        --iters 3 --warmup 1 --out "$out/e2e_$name.json" "$@" > "$out/e2e_$name.log" 2>&1
    echo "$name rc=$? $(grep '^| distill' "$out/e2e_$name.log")"
}
hf_baseline() {  # timed steps, warm-up steps: $out/hf_baseline_b1.json and .log
    timeout 150 python benchmarks/hf_gkd_baseline.py --preset llama-1b_from_8b --batch 1 --seq-length 1024 \
        --iters "$1" --warmup "$2" --out "$out/hf_baseline_b1.json" > "$out/hf_baseline_b1.log" 2>&1
    echo "hf_baseline_b1 rc=$? $(grep '"distill"' "$out/hf_baseline_b1.log" | tr '\n' ' ')"
}
