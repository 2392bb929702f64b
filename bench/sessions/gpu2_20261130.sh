#!/usr/bin/env bash
# Issue 16 on two H200s of one host, in two calls (each under 10 minutes); on the GPU machine after
# bench/device_setup.sh and the model carry (docs/benchmarks.md). Results under $OUT.
#   bash bench/sessions/gpu2_20261130.sh train_and_dp   # train.py end to end on 2 GPUs; DP speed variants
#   bash bench/sessions/gpu2_20261130.sh stage3         # ZeRO-3 at 1.1B and 7B, 1 and 2 GPUs
#   bash bench/sessions/gpu2_20261130.sh dp_overlap     # data parallel: all-reduces in flight, bf16, NCCL protocol
set -u
C=$(cat .snap/commit 2>/dev/null || git rev-parse --short HEAD)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
z() { local name=$1; shift; python3 bench/zero.py --commit "$C" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1;
      grep -E "^ +(1.1b|7b) x" "$OUT/$name.log"; }
case ${1:?train_and_dp or stage3} in
train_and_dp)
  nvidia-smi topo -m > "$OUT/topo.txt" 2>&1; lscpu > "$OUT/lscpu.txt" 2>&1
  # the README's main job on 2 GPUs (data parallel), then stage 3 stopped at step 20 and resumed on 1 GPU
  T=/tmp/tr; rm -rf $T; mkdir -p $T
  timeout 150 deepspeed --num_gpus 2 --master_port 29611 train.py --deepspeed ds_configs/qft.json \
    --output_dir $T/dp > "$OUT/train_dp.log" 2>&1; echo "train dp exit $?"
  timeout 120 deepspeed --num_gpus 2 --master_port 29612 train.py --deepspeed ds_configs/qft_zero3.json \
    --output_dir $T/z3 --stop_at 20 > "$OUT/train_z3_2gpu.log" 2>&1; echo "train z3 2 GPUs exit $?"
  timeout 120 deepspeed --num_gpus 1 --master_port 29613 train.py --deepspeed ds_configs/qft_zero3.json \
    --output_dir $T/z3 --resume_from_checkpoint $T/z3 > "$OUT/train_z3_resume_1gpu.log" 2>&1
  echo "train z3 resume on 1 GPU exit $?"
  for d in dp z3; do cp $T/$d/metrics.jsonl "$OUT/train_${d}_metrics.jsonl" 2>/dev/null; done
  tail -3 "$OUT"/train_*.log
  # data parallel at 1.1B: the 1-GPU baseline twice, bound and unbound, and bf16 all-reduce
  z dp_plain --runs 1.1b:1:0 1.1b:2:0
  z dp_bound --runs 1.1b:1:0 1.1b:2:0 --bind
  z dp_bf16 --runs 1.1b:2:0 --bind --comm_dtype bf16
  ;;
stage3)
  z z3 --runs 1.1b:1:3 1.1b:2:3 7b:1:3 7b:2:3 --bind
  ;;
dp_overlap)
  z dp_o1 --runs 1.1b:1:0 1.1b:2:0
  z dp_o4 --runs 1.1b:2:0 --overlap 4
  z dp_o4_bf16 --runs 1.1b:2:0 --overlap 4 --comm_dtype bf16
  NCCL_PROTO=Simple z dp_o4_simple --runs 1.1b:2:0 --overlap 4
  z dp_o1_again --runs 1.1b:2:0
  ;;
esac
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls -R | head -40
