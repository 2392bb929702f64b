#!/usr/bin/env bash
# The fidelity lr grid in one GPU call: every method's grid as its own process, all sharing the GPU
# (SmolLM2-135M runs are host-bound, so they overlap well), then one solo run per method for tok/s, which
# sharing lowers, then the merge. Losses and per-process peak memory do not depend on the sharing.
#   bash bench/fidelity_grid.sh OUT_DIR [COMMIT [PART ...]]    (STEPS=300 by default; SOLO_STEPS=40)
# Split over GPUs: one call per GPU with its own PARTS, CUDA_VISIBLE_DEVICES and PORT_BASE (default 29600),
# SOLO_STEPS=0 on all but one (no solo speed runs, no merge), then `python bench/fidelity.py --merge` the parts.
# SEEDS="0 1" runs every part for those seeds (default 0); GPU_SHARED_BY records how many processes share the
# GPU when several grids run on one (default: this grid's parts).
set -u
out=${1:?usage: bash bench/fidelity_grid.sh OUT_DIR [COMMIT]}
commit=${2:-unknown}
steps=${STEPS:-300}
solo_steps=${SOLO_STEPS:-40}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
# qft is the slowest method: its three lrs get a process each, so no process runs much longer than another.
# Any other split: name the parts after the commit (e.g. qft=1e-5,2e-5 lora=1e-4); DEFAULT_GRID otherwise.
parts=(fp32_adamw fp32_lion qft=5e-5 qft=1e-4 qft=2e-4 peqa qst lora)
if [ $# -gt 2 ]; then parts=("${@:3}"); fi
mkdir -p "$out"
pids=()
for i in "${!parts[@]}"; do
  d="$out/part$i"
  mkdir -p "$d"
  MASTER_PORT=$((${PORT_BASE:-29600} + i)) OMP_NUM_THREADS=2 "$py" "$here/fidelity.py" --lrs "${parts[$i]}" --steps "$steps" \
    --seeds ${SEEDS:-0} --gpu_shared_by "${GPU_SHARED_BY:-${#parts[@]}}" --commit "$commit" --out "$d" > "$d/log.txt" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "part $i (${parts[$i]}) failed; see $out/part$i/log.txt"; tail -5 "$out/part$i/log.txt"; failed=1; }
done
echo "grid done in ${SECONDS}s"
if [ "$solo_steps" = 0 ]; then
  rm -f "$out"/part*/*.png
  echo "all done in ${SECONDS}s (no solo runs, no merge)"
  exit $failed
fi
mkdir -p "$out/solo"
MASTER_PORT=$((${PORT_BASE:-29600} + 50)) "$py" "$here/fidelity.py" --steps "$solo_steps" --eval_every "$solo_steps" --commit "$commit" \
  --out "$out/solo" --runs fp32_adamw:3e-4:0 fp32_lion:5e-5:0 qft:1e-4:0 peqa:5e-4:0 qst:1e-2:0 lora:3e-3:0 \
  > "$out/solo/log.txt" 2>&1 || { echo "solo speed runs failed"; tail -5 "$out/solo/log.txt"; failed=1; }
"$py" "$here/fidelity.py" --merge "$out"/part*/fidelity_2*.json --solo "$(ls "$out"/solo/fidelity_2*.json | head -1)" \
  --out "$out" || failed=1
# the device tool brings back a limited number of files: keep the parts' JSONs and logs, drop their plots
rm -f "$out"/part*/*.png "$out"/part*/fidelity_partial.json "$out"/solo/*.png "$out"/solo/fidelity_partial.json
echo "all done in ${SECONDS}s"
exit $failed
