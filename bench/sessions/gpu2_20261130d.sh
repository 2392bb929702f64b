#!/usr/bin/env bash
# Issue 16 on two H200s: data parallel's speed-up against the per-GPU batch, in one call (the gap at 8x512 is
# a fixed host cost per step; does it vanish as the batch grows?), and ZeRO-3 at 7B with a bigger batch.
#   bash bench/sessions/gpu2_20261130d.sh COMMIT    # after bench/device_setup.sh; results under $OUT
set -u
C=${1:?commit}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
z() { local name=$1; shift; python3 bench/zero.py --commit "$C" --out "$OUT/$name" --sample "$@" > "$OUT/$name.log" 2>&1;
      grep -E "^ +(1.1b|7b) x" "$OUT/$name.log"; }
z b8 --runs 1.1b:1:0 1.1b:2:0
z b32 --runs 1.1b:1:0 1.1b:2:0 1.1b:1:0 1.1b:2:0 --batch 32 --no-warm-machine
z b16 --runs 1.1b:1:0 1.1b:2:0 --batch 16 --no-warm-machine
z 7b_z3_b4 --runs 7b:1:3 7b:2:3 --batch 4 --no-warm-machine
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls
