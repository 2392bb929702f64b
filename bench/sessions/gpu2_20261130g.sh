#!/usr/bin/env bash
# Issue 16 on two H200s: data parallel at 8x512 per GPU with PyTorch's default allocator against
# expandable segments, alternated in one call (one pair each in the call before: 1.63x default, 1.06x expandable).
#   bash bench/sessions/gpu2_20261130g.sh COMMIT    # after bench/device_setup.sh; results under $OUT
set -u
C=${1:?commit}
z() { local name=$1; shift; python3 bench/zero.py --commit "$C" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1;
      grep -E "^ +(1.1b|7b) x" "$OUT/$name.log"; }
unset PYTORCH_CUDA_ALLOC_CONF
z plain1 --runs 1.1b:1:0 1.1b:2:0
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True z expandable --runs 1.1b:1:0 1.1b:2:0 --no-warm-machine
z plain2 --runs 1.1b:1:0 1.1b:2:0 --no-warm-machine
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls
