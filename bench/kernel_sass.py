"""Static instruction mix of the Triton kernels for an H100 (sm_90), on any machine: compile as the JIT
would at run time (aligned pointers, n % 16 == 0), disassemble the cubin with the nvdisasm that Triton
ships, count SASS opcodes. The Lion kernel is issue-bound on the H100: the total count is the lever (a
variant with fewer conversions but more instructions measured slower, fewer Philox rounds faster), so
that comes first; conversions (I2F, F2I, FRND: a narrower pipe) are listed after it. The count is static:
loops (the outlier ones) count once, however often they run.

    python bench/kernel_sass.py                      # every kernel configuration of the compile check
    python bench/kernel_sass.py "lion 3d r0 outliers ok=norm"
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops"))
import aot_compile  # noqa: E402  (the kernel configurations CI compiles)

CONVERSIONS = ("I2F", "I2FP", "F2I", "F2IP", "FRND", "F2F", "I2I")


def sass_mix(kernel, sig, const) -> Counter:
    cubin = aot_compile.compile_sm90(kernel, sig, const).asm["cubin"]
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([str(nvdisasm), "-c", path], capture_output=True, text=True, check=True).stdout
    ops = Counter()
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def main(argv=None) -> int:
    want = set(argv if argv is not None else sys.argv[1:])
    for name, kernel, sig, const in aot_compile.configs():
        if want and name not in want:
            continue
        ops = sass_mix(kernel, sig, const)
        conv = sum(ops[c] for c in CONVERSIONS)
        print(f"{name}: {sum(ops.values())} SASS instructions, {conv} conversions "
              f"({', '.join(f'{c} {ops[c]}' for c in CONVERSIONS if ops[c])}); "
              f"top: {', '.join(f'{k} {v}' for k, v in ops.most_common(8))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
