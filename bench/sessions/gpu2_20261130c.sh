#!/usr/bin/env bash
# Issue 16 on two H200s: where does the two-GPU data-parallel host lose its 60-75 ms per step?
#   bash bench/sessions/gpu2_20261130c.sh COMMIT    # after bench/device_setup.sh; results under $OUT
# --sample records each rank's Python stacks (main thread and autograd's device thread) every 2 ms over the
# timed steps, and busy_threads every thread's share of a core: a wait in one call against a slower core.
# --batch 32 asks whether the gap is a fixed host cost per step (it then shrinks as the batch grows).
set -u
C=${1:?commit}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
z() { local name=$1; shift; python3 bench/zero.py --commit "$C" --out "$OUT/$name" --sample "$@" > "$OUT/$name.log" 2>&1;
      grep -E "^ +(1.1b|7b) x" "$OUT/$name.log"; }
z dp --runs 1.1b:1:0 1.1b:2:0 1.1b:1:0 1.1b:2:0
z dp_b32 --runs 1.1b:1:0 1.1b:2:0 --batch 32 --no-warm-machine
python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*/zero_*.json")):
    for r in json.load(open(f))["rows"]:
        print(f.split("/")[-2], r["model"], "x%d z%d b%d" % (r["world_size"], r["stage"], r["batch"]),
              "step", r.get("step_s_per_rank"), "host", r.get("host_s_per_rank"), "tok/s", r.get("tok_s") and round(r["tok_s"]))
        for rank, (hs, bt) in enumerate(zip(r.get("host_samples_per_rank") or [], r.get("busy_threads_per_rank") or [])):
            print("  rank", rank, "main cpu", hs and hs["main_thread_cpu_frac"], "threads",
                  [(t["thread"], t["core_frac"]) for t in (bt or [])[:4]])
            for k, v in (hs or {}).get("qft_ds", [])[:8]:
                print("     %.3f %s" % (v, k))
PY
cd "$OUT" && tar -czf all.tar.gz --exclude=all.tar.gz . 2>/dev/null; ls
