#!/usr/bin/env bash
# On a lent GPU (carry .whl): where the cluster kernel's warps stall, per source line. For each
# SPECS entry (build:kind; default the two kind groups' default builds) Nsight Compute samples one
# launch of the build compiled with -lineinfo (cluster_probe.py --profile --lineinfo), and the
# source page is reduced to the lines (or SASS instructions) with the most stall samples.
# Reports, CSVs and logs in $OUT.
source benchmarks/device_setup.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 1; }
"$NCU" --version | tail -1
for spec in ${SPECS:-c8t128s1m2abnf:forward_kl c8t128s1m2hqanfe:jsd}; do
  b=${spec%%:*}; k=${spec#*:}
  timeout 120 "$NCU" -f -k distill_cluster_single_pass --launch-skip 1 --launch-count 1 --import-source yes \
    --section SourceCounters --section WarpStateStats -o "$OUT/stalls_${b}_$k" \
    python benchmarks/cluster_probe.py --builds "$b" --kinds "$k" --profile --lineinfo > "$OUT/stalls_${b}_$k.log" 2>&1
  for view in cuda sass; do
    "$NCU" --import "$OUT/stalls_${b}_$k.ncu-rep" --page source --csv --print-source "$view" \
      > "$OUT/stalls_${b}_${k}_$view.csv" 2>> "$OUT/stalls_${b}_$k.log"
  done
  echo "== $b $k"
  # the CUDA view needs the source imported into the report; the SASS view always works
  # (stall_lines.py exits 1 on a view without samples)
  python benchmarks/sweeps/stall_lines.py "$OUT/stalls_${b}_${k}_cuda.csv" 14 \
    || python benchmarks/sweeps/stall_lines.py "$OUT/stalls_${b}_${k}_sass.csv" 14
done
