#!/usr/bin/env bash
# One H200, no model carry (random-init shapes): issue 15's open kernel and set-up measurements.
#   bash bench/sessions/h200_20261130b.sh COMMIT      # after bench/device_setup.sh; results under $OUT
# 1. bench/lion_bandwidth.py: the m4_vec and keep_outliers sweeps against today's kernels, same process.
# 2. LLaMA-7B 1x512: int8 qft beside qft_big's int4 (today's kernel and m4_vec), same process.
# 3. Llama-3-8B 1x2048 qft_big: the set-up peak with the chunked quantizer (predicted 12.17 GiB).
set -u
C=${1:?commit}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 bench/lion_bandwidth.py --commit "$C" > "$OUT/lion_bandwidth.log" 2>&1; echo "lion_bandwidth exit $?"
cp bench/results/lion_sweep_*.json "$OUT/" 2>/dev/null
grep -E "m4_vec|keep_outliers|copy" "$OUT/lion_bandwidth.log" | head -30
python3 bench/memory_speed.py --shapes 7b --methods qft_m4_chunked qft_m4vec_chunked qft --warmup 4 --iters 16 \
  --skip-bandwidth --commit "$C" --out "$OUT" > "$OUT/ms_7b.log" 2>&1; echo "7b exit $?"
grep -E ": ok|oom|error" "$OUT/ms_7b.log"
python3 bench/memory_speed.py --shapes llama3-8b --methods qft_m4_chunked --skip-bandwidth --commit "$C" \
  --out "$OUT" > "$OUT/ms_8b.log" 2>&1; echo "8b exit $?"
grep -E "set up in|: ok|oom|error" "$OUT/ms_8b.log"
