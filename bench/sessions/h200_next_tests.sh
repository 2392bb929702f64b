#!/usr/bin/env bash
# One H200, no model carry: the kernel tests compiled (not interpreted) on the GPU, every failure named (-rf),
# then the bits probes that failed at 5626d81 (int32 counter, fixed in 84c7374) once more on their own.
#   bash bench/sessions/h200_next_tests.sh    # after bench/device_setup.sh
set -u
timeout 480 python3 -m pytest -q -rf -p no:cacheprovider tests/ops > "$OUT/tests_ops_compiled.log" 2>&1
echo "tests/ops compiled: exit $?"; grep -E "^FAILED|passed|failed" "$OUT/tests_ops_compiled.log" | tail -12
