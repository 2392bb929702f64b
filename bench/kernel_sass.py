"""Static instruction mix of the Triton kernels for an H100 (sm_90), on any machine: compile as the JIT
would at run time (aligned pointers, n % 16 == 0), disassemble the cubin with the nvdisasm that Triton
ships, count SASS opcodes. The Lion kernel is issue-bound on the H100: the total count is the lever (a
variant with fewer conversions but more instructions measured slower, fewer Philox rounds faster), so
that comes first; conversions (I2F, F2I, FRND: a narrower pipe) are listed after it. The count is static:
loops (the outlier ones) count once, however often they run. `--bits-sweep` compiles the one-tile Lion
kernel as bench/lion_bandwidth.py's BITS_SWEEP launches it (1% outliers fused, the training flags) and
adds instructions per element and the highest register used (an occupancy estimate; spills as STL/LDL).
`--m4-vec-sweep` does the same for M4_VEC_SWEEP (today's int4 kernel against its byte-tile variant), and
`--keep-outliers-sweep` for KEEP_OUTLIERS_SWEEP (the outlier indices kept across the barrier). Every
row counts its memory instructions by width too (LDG.E.U8 a byte, LDG.E.64 8 bytes, LDG.E.128 16; STS/LDS
shared memory; BAR barriers), static like the rest.

    python bench/kernel_sass.py                      # every kernel configuration of the compile check
    python bench/kernel_sass.py "lion 3d r0 outliers ok=norm"
    python bench/kernel_sass.py --bits-sweep --write # bench/results/kernel_sass_*.json
    python bench/kernel_sass.py --m4-vec-sweep --write   # bench/results/kernel_sass_m4_vec_*.json
    python bench/kernel_sass.py --keep-outliers-sweep --write  # ..._keep_outliers_*.json
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
MEMORY = re.compile(r"\b((?:LDG|STG|LDS|STS|LDL|STL|BAR)(?:\.[A-Z0-9_]+)*)")


def disassemble(kernel, sig, const, num_warps=4) -> str:
    cubin = aot_compile.compile_sm90(kernel, sig, const, num_warps).asm["cubin"]
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([str(nvdisasm), "-c", path], capture_output=True, text=True, check=True).stdout


def opcodes(text: str) -> Counter:
    ops = Counter()
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def sass_mix(kernel, sig, const, num_warps=4) -> Counter:
    return opcodes(disassemble(kernel, sig, const, num_warps))


def memory_mix(text: str) -> Counter:
    """Memory instructions with their width modifiers (LDG.E.64 ...), barriers as BAR.SYNC..."""
    ops = Counter()
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and MEMORY.fullmatch(m.group(1)):
            ops[m.group(1)] += 1
    return ops


def bits_sweep_configs(sweep=None):
    """(name, kernel, signature, constexprs, num_warps, elements per thread, knobs) for each BITS_SWEEP entry (or
    `sweep`'s: M4_VEC_SWEEP), with the constexprs triton_backend._launch_3d derives for a 128-column
    weight group and 256-element blocks."""
    import lion_bandwidth
    from qft_ds.ops import triton_kernels as tk
    for knobs in lion_bandwidth.BITS_SWEEP if sweep is None else sweep:
        m4 = knobs["momentum_bits"] == 4
        sig = {**aot_compile.LION_3D_ARGS, "ok_ptr": "*fp32",
               **({"m_ptr": "*u8"} if m4 else {})}
        const = {"G": 128, "K": 2, "RM": knobs["chunk"] // 256, "ROUNDING": 0, "ROUNDS": knobs.get("philox_rounds", 10),
                 "OUTLIERS": True,
                 "OB": 64, "OK_FLOAT": True, "CLIP": True, "M4": m4, "RAND_BITS": knobs["rand_bits"],
                 "M4_VEC": knobs.get("m4_vec", False), "KEEP_OUTLIERS": knobs.get("keep_outliers", False)}
        name = "lion 3d bits sweep " + " ".join(f"{k}={v}" for k, v in knobs.items())
        per_thread = knobs["chunk"] // (32 * knobs["num_warps"])
        yield name, tk.lion_kernel_3d, sig, const, knobs["num_warps"], per_thread, knobs


def describe(text: str, per_thread: int | None = None) -> dict:
    ops = opcodes(text)
    total = sum(ops.values())
    out = {"instructions": total, "conversions": sum(ops[c] for c in CONVERSIONS),
           "conversion_mix": {c: ops[c] for c in CONVERSIONS if ops[c]},
           "top": dict(ops.most_common(8)), "memory": dict(sorted(memory_mix(text).items())),
           "spill_stores": ops["STL"], "spill_loads": ops["LDL"],
           "max_register": max((int(r) for r in re.findall(r"\bR(\d+)\b", text)), default=-1) + 1}
    if per_thread:
        out["elements_per_thread"] = per_thread
        out["instructions_per_element"] = round(total / per_thread, 2)
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="configurations of tests/ops/aot_compile.py (default: all)")
    p.add_argument("--bits-sweep", action="store_true", help="bench/lion_bandwidth.py's BITS_SWEEP instead")
    p.add_argument("--m4-vec-sweep", action="store_true", help="bench/lion_bandwidth.py's M4_VEC_SWEEP instead")
    p.add_argument("--keep-outliers-sweep", action="store_true", help="its KEEP_OUTLIERS_SWEEP instead")
    p.add_argument("--write", action="store_true", help="write bench/results/kernel_sass_*.json")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line at the end")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if args.bits_sweep or args.m4_vec_sweep or args.keep_outliers_sweep:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import lion_bandwidth
        sweep = (lion_bandwidth.M4_VEC_SWEEP if args.m4_vec_sweep else
                 lion_bandwidth.KEEP_OUTLIERS_SWEEP if args.keep_outliers_sweep else None)
        configs = list(bits_sweep_configs(sweep))
    else:
        configs = [(name, kernel, sig, const, 4, None, {}) for name, kernel, sig, const in aot_compile.configs()
                   if not args.names or name in args.names]
    rows = []
    for name, kernel, sig, const, nw, per, knobs in configs:
        row = {"name": name, **knobs, "num_warps": nw, **describe(disassemble(kernel, sig, const, nw), per)}
        rows.append(row)
        extra = (f", {row['instructions_per_element']} per element, ~{row['max_register']} registers, "
                 f"spills {row['spill_stores']}" if per else "")
        conv = ", ".join(f"{c} {v}" for c, v in row["conversion_mix"].items())
        print(f"{name}: {row['instructions']} SASS instructions, {row['conversions']} conversions ({conv}){extra}; "
              f"top: {', '.join(f'{k} {v}' for k, v in row['top'].items())}; "
              f"memory: {', '.join(f'{k} {v}' for k, v in row['memory'].items())}", flush=True)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common
        name = "kernel_sass" + ("_m4_vec" if args.m4_vec_sweep else
                                "_keep_outliers" if args.keep_outliers_sweep else "")
        path = common.write_result(name, {**common.header(args.commit), "target": "sm_90 (static)",
                                                   "triton": triton.__version__, "configs": rows})
        print(f"wrote {path}")
    if args.json:
        import json
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
