#!/usr/bin/env bash
# The embedded default: a tiny teacher is pre-trained on built-in synthetic data, then distilled
# into a tiny student, with TP=2 x PP=2. On a machine without a GPU it runs 4 CPU processes
# (gloo); with 4+ GPUs it runs on 4 GPUs (NCCL); with 1-3 GPUs it runs on one GPU at TP=1 x PP=1
# (NCCL cannot put two ranks on one GPU). Extra arguments are passed on as flags.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -ge 4 ]; then
  nproc=4; layout=()
elif [ "$gpus" -ge 1 ]; then
  nproc=1; layout=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1)
else
  nproc=4; layout=(--device cpu)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" launch/pretrain_distill.py \
  --config-file configs/quickstart.yaml "${layout[@]}" "$@"
