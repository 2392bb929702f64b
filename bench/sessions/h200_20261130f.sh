#!/usr/bin/env bash
# One H200, after h200_20261130e.sh left the model's first part in /tmp/m (carry .devB and .whl): the QA
# answer-loss benchmark for the Lion kernels' random bits, paired in one call: qft (16 random bits per
# element, the new default) against qft_bits32 (the stream before it) at the lr each task chose for qft
# (results/qa_fidelity_{play,speaker}_20261130-0012.json), seeds 0-3 on play and 0-2 on speaker, 14
# processes sharing the GPU, each its own MASTER_PORT. Everything merged per task into $OUT.
#   COMMIT=sha bash bench/sessions/h200_20261130f.sh     # after: source bench/device_setup.sh
set -u
cat /tmp/m/part_aa .devB/part_ab > /tmp/m/model.gguf
sha256sum /tmp/m/model.gguf | cut -c1-12
model=$(python3 -c "from qft_ds import hub; print(hub.prepare_default_model())" | tail -1) || exit 1
specs=()
for s in 0 1 2 3; do specs+=("play qft:5e-05:$s" "play qft_bits32:5e-05:$s"); done
for s in 0 1 2; do specs+=("speaker qft:0.0001:$s" "speaker qft_bits32:0.0001:$s"); done
n=${#specs[@]}
pids=()
for i in "${!specs[@]}"; do
  read -r task run <<< "${specs[$i]}"
  d="$OUT/runs/r$i"; mkdir -p "$d"
  MASTER_PORT=$((29800 + i)) OMP_NUM_THREADS=1 timeout -s INT -k 20 440 python3 bench/qa_fidelity.py --task "$task" \
    --runs "$run" --steps 300 --commit "$COMMIT" --model "$model" --gpu_shared_by "$n" --out "$d" > "$d/log.txt" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || echo "r$i (${specs[$i]}) stopped: exit $?"; done
echo "runs done in ${SECONDS}s"
for task in play speaker; do
  files=$(ls "$OUT"/runs/r*/qa_fidelity_"$task"_2*.json 2>/dev/null)
  [ -n "$files" ] && python3 bench/qa_fidelity.py --merge $files --out "$OUT" > "$OUT/merge_$task.log" 2>&1
  tail -3 "$OUT/merge_$task.log"
done
for d in "$OUT"/runs/r*; do echo "=== $(basename "$d")"; tail -5 "$d/log.txt"; done > "$OUT/runs.log" 2>&1
tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
