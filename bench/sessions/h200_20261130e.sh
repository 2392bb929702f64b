#!/usr/bin/env bash
# One H200 (issue 15, the Lion kernel's 80%): the bandwidth sweep at 16 random bits (the new default) against
# 32 and 8 and 7 Philox rounds, int8 and int4, 1% outliers; the streams-only ceiling; the kernel tests
# compiled; and the model's first part copied for the fidelity call that follows (ENVIRONMENT.md).
#   COMMIT=sha bash bench/sessions/h200_20261130e.sh     # after: source bench/device_setup.sh
set -u
mkdir -p /tmp/m && cp .devA/part_aa /tmp/m/ 2>/dev/null
python3 bench/lion_bandwidth.py --commit "$COMMIT" > "$OUT/lion_sweep.log" 2>&1; echo "sweep: exit $?"
cp bench/results/lion_sweep_*.json "$OUT/" 2>/dev/null
grep -E "with 1% outliers \{'momentum_bits'|copy" "$OUT/lion_sweep.log" | tail -14
python3 bench/sessions/lion_ceiling_20261130.py --commit "$COMMIT" > "$OUT/lion_ceiling.json" 2>"$OUT/lion_ceiling.err"; echo "ceiling: exit $?"
cat "$OUT/lion_ceiling.json"
timeout 300 python3 -m pytest -q -rf -p no:cacheprovider tests/ops > "$OUT/tests_ops_compiled.log" 2>&1
echo "tests/ops compiled: exit $?"; grep -E "^FAILED|passed|failed" "$OUT/tests_ops_compiled.log" | tail -12
