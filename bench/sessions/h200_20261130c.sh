#!/usr/bin/env bash
# One H200, no model carry: the offload's CUDA test and its 13B peak; why int4 costs speed at 7B.
#   bash bench/sessions/h200_20261130c.sh COMMIT      # after bench/device_setup.sh; results under $OUT
set -u
C=${1:?commit}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 240 python3 -m pytest -q -x tests/nn/test_offload_cuda.py tests/ops/test_lion_m4_vec.py \
  tests/ops/test_lion_keep_outliers.py > "$OUT/pytest_gpu.log" 2>&1; echo "gpu tests exit $?"; tail -2 "$OUT/pytest_gpu.log"
python3 bench/memory_speed.py --shapes 13b --methods qft_m4_chunked qft_m4_chunked_offload --skip-bandwidth \
  --commit "$C" --out "$OUT" > "$OUT/ms_13b.log" 2>&1; echo "13b exit $?"
grep -E "set up in|: ok|oom|rror" "$OUT/ms_13b.log"
python3 bench/memory_speed.py --shapes 7b --methods qft qft_m4 qft_m4_chunked qft_m4_bytewise_chunked qft_chunked \
  --warmup 4 --iters 16 --skip-bandwidth --profile qft qft_m4_chunked --commit "$C" --out "$OUT" > "$OUT/ms_7b.log" 2>&1
echo "7b exit $?"; grep -E ": ok|oom|rror" "$OUT/ms_7b.log"
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls
