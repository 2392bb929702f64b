#!/usr/bin/env bash
# Issue 16 on two H200s: at 8x512 per GPU (host-paced), the two-GPU rank's slower lines were the ones that
# allocate or free an fp32 gradient buffer that NCCL's stream used (the cast before the all-reduce, the
# update's end) besides the all-reduce call itself. Three allocator settings, each a 1-GPU/2-GPU pair.
#   bash bench/sessions/gpu2_20261130f.sh COMMIT    # after bench/device_setup.sh; results under $OUT
set -u
C=${1:?commit}
z() { local name=$1; shift; python3 bench/zero.py --commit "$C" --out "$OUT/$name" --sample "$@" > "$OUT/$name.log" 2>&1;
      grep -E "^ +(1.1b|7b) x" "$OUT/$name.log"; }
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
z expandable --runs 1.1b:1:0 1.1b:2:0
unset PYTORCH_CUDA_ALLOC_CONF
z plain_alloc --runs 1.1b:1:0 1.1b:2:0 --no-warm-machine
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCH_NCCL_AVOID_RECORD_STREAMS=1
z no_record_stream --runs 1.1b:1:0 1.1b:2:0 --no-warm-machine
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls
