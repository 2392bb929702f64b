#!/usr/bin/env bash
# One H200, no model carry (issue 15 item 5's missing rows): the bf16 and fp32 AdamW baselines at the
# Llama-3-8B and LLaMA-2-13B shapes beside qft_big's settings in the same process, and cpu_checkpointing at 8B.
#   bash bench/sessions/h200_20261130d.sh COMMIT 8b|13b|70b   # after bench/device_setup.sh; results under $OUT
set -u
C=${1:?commit}; WHAT=${2:?8b, 13b or 70b}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
ms() { local name=$1; shift; timeout "$T" python3 bench/memory_speed.py --skip-bandwidth --commit "$C" --out "$OUT" "$@" \
         > "$OUT/ms_$name.log" 2>&1; echo "$name exit $?"; grep -E "set up in|: ok|oom|rror" "$OUT/ms_$name.log"; }
case $WHAT in
  8b)  T=280 ms 8b --shapes llama3-8b --methods qft_m4_chunked qft_m4_chunked_offload bf16_adamw fp32_adamw --warmup 2 --iters 4
       T=280 ms 13b --shapes 13b --methods qft_m4_chunked bf16_adamw fp32_adamw --warmup 2 --iters 4 ;;
  # the 70B shape: set-up time with today's chunked quantizer, and the layer inputs in host memory
  70b) T=560 ms 70b --shapes 70b --methods qft_m4_chunked qft_m4_chunked_offload --warmup 2 --iters 3 ;;
esac
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls
