#!/usr/bin/env bash
# One H200, no model carry (issue 15 item 4): Nsight Compute on the training Lion kernel, int8 and int4
# momentum with 1% outliers, to tell issue-bound from latency-bound (bench/lion_ncu.py says why), with the
# per-instruction stall samples (source page, SASS) to place the time. Clocks left alone (H200.md).
#   bash bench/sessions/h200_next_ncu.sh    # after bench/device_setup.sh; results under $OUT
set -u
for b in 8 4; do
  timeout 240 ncu --clock-control none -k regex:lion_kernel --launch-skip 2 --launch-count 1 --set full \
    --import-source yes -o "$OUT/lion_int$b" python3 bench/lion_ncu.py --momentum_bits $b > "$OUT/ncu_int$b.log" 2>&1
  echo "ncu int$b exit $?"
  ncu --import "$OUT/lion_int$b.ncu-rep" --page details > "$OUT/lion_int${b}_details.txt" 2>&1
  ncu --import "$OUT/lion_int$b.ncu-rep" --page raw --csv > "$OUT/lion_int${b}_raw.csv" 2>&1
  ncu --import "$OUT/lion_int$b.ncu-rep" --page source --print-source sass --csv > "$OUT/lion_int${b}_sass.csv" 2>&1
  grep -E "Issue Slots Busy|SM Busy|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|DRAM Throughput|Registers Per|Eligible Warps|No Eligible|Duration|Executed Ipc" \
    "$OUT/lion_int${b}_details.txt" | head -24
done
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls -la
