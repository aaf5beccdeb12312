#!/usr/bin/env bash
# The quality benchmark's GPU run split into short device calls, one per student segment, each
# carrying its state to the next instead of relying on a warm machine (two ~10-minute calls of
# this benchmark were lost on 2026-11-23). Call K trains segment K of $METHODS; call 1 also trains
# the teacher (kd / gkd only) and takes the warm start from $WARM_DIR; a call K > 1 continues from
# the state call K-1 returned, carried in as .devcarry/state.tgz.part-*. Each call leaves in OUTDIR:
# state.tgz.part-* (<= 15 MB each, the device tool's file limit: the teacher, the last segment's
# exports, results.json), results.json and logs.tgz. A lost call is simply run again.
# Usage (repository root): bash benchmarks/sweeps/quality_short_calls.sh K OUTDIR
#   env: SCALE (h100), METHODS (gkd), WARM_DIR (.devcarry/qwarm),
#        MERGE (call 1 only: an earlier run's results.json to carry into the results)
set -euo pipefail
k=${1:?segment number K}
out=${2:?output directory}
scale=${SCALE:-h100}
methods=${METHODS:-gkd}
warm=${WARM_DIR:-.devcarry/qwarm}
state=runs/state
mkdir -p "$out" runs
if [ -d .whl ] && ! python3 -c "import megatron.core" 2>/dev/null; then
    source benchmarks/device_setup.sh
fi
merge=${MERGE:-}
if [ "$k" -gt 1 ]; then
    rm -rf "$state"
    cat .devcarry/state.tgz.part-* | tar xzf - -C runs
    cp "$state/results.json" runs/previous_results.json
    merge=runs/previous_results.json
fi
python3 benchmarks/quality/run.py --scale "$scale" --methods "$methods" --max-segments "$k" \
    --warm-dir "$warm" --work "$state/work" ${merge:+--merge "$merge"} --out "runs/q$k"
cp "runs/q$k/results.json" "$state/results.json"
# What the next call needs: the teacher and each method's last segment (the rest is rebuilt).
find "$state/work" -mindepth 1 -maxdepth 1 ! -name teacher_kept ! -name "*_seg$k" -exec rm -rf {} +
tar czf - -C runs state | split -b 15M - "$out/state.tgz.part-"
cp "runs/q$k/results.json" "$out/results.json"
tar czf "$out/logs.tgz" -C "runs/q$k" logs $(cd "runs/q$k" && ls accuracy.png 2>/dev/null)
ls -la "$out"
