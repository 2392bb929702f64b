#!/usr/bin/env bash
# Issue 16 on two H200s: train.py at ZeRO stage 3 on 2 GPUs since the tied-head prefetch fix (the warning
# came once per rank in the final evaluation before it), stopped at step 20 and resumed on 1 GPU.
#   bash bench/sessions/gpu2_20261130e.sh    # after bench/device_setup.sh and the two-call model carry
set -u
T=/tmp/tr; rm -rf $T; mkdir -p $T
timeout 200 deepspeed --num_gpus 2 --master_port 29621 train.py --deepspeed ds_configs/qft_zero3.json \
  --output_dir $T/z3 --stop_at 20 > "$OUT/train_z3_2gpu.log" 2>&1; echo "train z3 2 GPUs exit $?"
# one GPU resumes with the micro-batch doubled: train.py keeps micro-batch x ranks (the data order)
python3 -c "import json; c = json.load(open('ds_configs/qft_zero3.json')); c['train_micro_batch_size_per_gpu'] *= 2; \
json.dump(c, open('$T/zero3_1gpu.json', 'w'))"
timeout 200 deepspeed --num_gpus 1 --master_port 29622 train.py --deepspeed $T/zero3_1gpu.json \
  --output_dir $T/z3 --resume_from_checkpoint $T/z3 > "$OUT/train_z3_resume_1gpu.log" 2>&1
echo "train z3 resume on 1 GPU exit $?"
cp $T/z3/metrics.jsonl "$OUT/train_z3_metrics.jsonl" 2>/dev/null
echo "prefetch warnings (2 GPUs, resume):" $(grep -ci "prefetch" "$OUT/train_z3_2gpu.log") $(grep -ci "prefetch" "$OUT/train_z3_resume_1gpu.log")
grep -iE "held-out|eval|resum|saved" "$OUT"/train_z3_*.log | tail -12
