#!/usr/bin/env bash
# Issue 16 on two H200s: where a warm 2-GPU data-parallel step spends its extra time against one GPU's.
#   bash bench/sessions/gpu2_20261130b.sh COMMIT    # after bench/device_setup.sh; results under $OUT
# zero.py records each rank's host time per step (when the host has queued the step) beside the step time,
# and --profile writes every rank's Chrome trace and step_timeline's GPU busy/idle reading.
set -u
C=${1:?commit}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
z() { local name=$1; shift; python3 bench/zero.py --commit "$C" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1;
      grep -E "^ +(1.1b|7b) x" "$OUT/$name.log"; }
z dp --runs 1.1b:1:0 1.1b:2:0 1.1b:1:0
z dp_prof --runs 1.1b:1:0 1.1b:2:0 --profile "$OUT/prof" --no-warm-machine
z z3_prof --runs 1.1b:1:3 1.1b:2:3 --profile "$OUT/prof" --no-warm-machine
python3 - "$OUT" <<'PY'
import glob, json, statistics, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*/zero_*.json")):
    for r in json.load(open(f))["rows"]:
        print(f.split("/")[-2], r["model"], "x%d z%d" % (r["world_size"], r["stage"]), "step", r.get("step_s_per_rank"),
              "host", r.get("host_s_per_rank"), "tok/s", r.get("tok_s") and round(r["tok_s"]))
for f in sorted(glob.glob(f"{sys.argv[1]}/prof/timeline_*.json")):
    steps = json.load(open(f))
    print(f.split("/")[-1], {k: statistics.median(s[k] for s in steps) for k in ("step_ms", "gpu_busy_ms", "gpu_idle_ms", "host_wait_ms", "kernels")})
PY
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls -R | head -40
