#!/usr/bin/env bash
# Source this on a GPU machine that has torch but not megatron-core / omegaconf: installs the
# wheels carried in .whl/ (megatron-core 0.16.1, omegaconf, antlr4 runtime, liger-kernel) into
# /tmp/site and puts it and the repository on PYTHONPATH. No network needed.
# benchmarks/trl_gkd_baseline.py also needs trl and datasets (the GPU image lacks both):
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl \
#       trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$(pwd):${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
