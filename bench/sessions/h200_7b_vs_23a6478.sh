#!/usr/bin/env bash
# One H200, no model carry (issue 15: "LLaMA-7B 1 x 512 tok/s >= today's", today's being 23a6478, 2,523 tok/s in
# the issue's table). The 7B step is host-paced and its tok/s moves by ~25% between runs on these machines,
# so the baseline's code and this tree's run alternately, one process each, ROUNDS times, same machine:
#   git archive 23a6478 qft_ds ops bench setup.py > .snap/base.tar     # here, before the call
#   bash bench/sessions/h200_7b_vs_23a6478.sh [ROUNDS]                  # after bench/device_setup.sh
set -u
ROUNDS=${1:-3}
mkdir -p /tmp/base && tar xf .snap/base.tar -C /tmp/base
for r in $(seq 1 "$ROUNDS"); do
  for tree in base head; do
    dir=$PWD; [ "$tree" = base ] && dir=/tmp/base
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 240 python3 bench/memory_speed.py --shapes 7b --methods qft \
       --skip-bandwidth --warmup 3 --iters 8 --commit "$([ $tree = base ] && echo 23a6478 || cat .snap/commit)" --out "$OUT/${tree}_$r" > "$OUT/${tree}_$r.log" 2>&1)
    echo "$tree round $r exit $?: $(grep -ho '"tok_s": [0-9.]*' "$OUT/${tree}_$r"/*.json 2>/dev/null | head -1)"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, glob, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {t: [] for t in ("base", "head")}
for t in runs:
    for r in range(1, rounds + 1):
        f = glob.glob(f"{out}/{t}_{r}/*.json")
        row = json.load(open(f[0]))["rows"][0] if f else {}
        runs[t].append({"round": r, "tok_s": row.get("tok_s"), "peak_gib": row.get("peak_gib"), "commit": json.load(open(f[0])).get("commit") if f else None})
ratios = [h["tok_s"] / b["tok_s"] for b, h in zip(runs["base"], runs["head"]) if b["tok_s"] and h["tok_s"]]
summary = {"shape": "7b", "batch": 1, "seq": 512, "method": "qft", "baseline_commit": "23a6478", "runs": runs,
           "head_over_base_per_round": ratios, "median_ratio": statistics.median(ratios) if ratios else None}
json.dump(summary, open(f"{out}/pairs_7b_vs_23a6478.json", "w"), indent=1)
print(json.dumps({"ratios": ratios, "median": summary["median_ratio"]}))
PY
