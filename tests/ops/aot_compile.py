"""Compile every Triton kernel for an H100 (sm_90) without a GPU: Triton's front end and ptxas run on
the CPU. The interpreter does not type-check the way the compiler does (a loop-carried variable that
changes type ran interpreted and failed compiled), so CI compiles too. Run as a script, without
TRITON_INTERPRET; prints one line per configuration, `ok` or `FAIL <error>`."""
import itertools
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "compile checks need the real @triton.jit"
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from qft_ds.ops import triton_kernels as tk  # noqa: E402
from qft_ds.ops.triton_backend import _next_pow2  # noqa: E402

LION_ARGS = {"w_ptr": "*i8", "ws_ptr": "*fp32", "m_ptr": "*i8", "ms_ptr": "*fp32", "g_ptr": "*bf16", "r_ptr": "*i8",
             "ok_ptr": "*i1", "n": "i64", "lr": "fp32", "beta1": "fp32", "beta2": "fp32", "decay": "fp32",
             "grad_scale": "fp32", "mix": "fp32", "g2": "fp32", "key": "i64", "offset": "i64", "clip": "fp32"}
OUTLIER_ARGS = {"oi_ptr": "*i32", "ov_ptr": "*fp32", "optr_ptr": "*i32"}
LION_3D_ARGS = {**LION_ARGS, **OUTLIER_ARGS, "m_bytes": "i64"}  # m_bytes: the packed int4 momentum's length


def configs():
    """(name, kernel, runtime signature, constexprs): what triton_backend launches for LLaMA (G 128) and
    SmolLM2 (G 96) weights with 256-element momentum blocks."""
    yield "dequant", tk.dequant_kernel, {"codes_ptr": "*i8", "scales_ptr": "*fp32", "out_ptr": "*bf16", "n": "i64"}, \
        {"G": 96, "BLOCK": 4096}
    yield "dequant hybrid", tk.dequant_hybrid_kernel, {"codes_ptr": "*i8", "scales_ptr": "*fp32", "out_ptr": "*bf16",
                                                       "n": "i64", **OUTLIER_ARGS}, {"G": 128, "BLOCK": 8192, "OB": 64}
    for rounding in (0, 1):
        yield f"quant r{rounding}", tk.quant_kernel, {"x_ptr": "*fp32", "codes_ptr": "*i8", "scales_ptr": "*fp32",
                                                      "n": "i64", "key": "i64", "offset": "i64"}, \
            {"B": 256, "BP2": 256, "ROUNDING": rounding}
    for (g, rw, rm), rounding, quad in itertools.product([(96, 32, 12), (128, 16, 8)], (0, 1, 2), (True, False)):
        yield f"lion 2pass G{g} r{rounding} quad={quad}", tk.lion_kernel, LION_ARGS, \
            {"G": g, "GP2": _next_pow2(g), "RW": rw, "RWP2": _next_pow2(rw), "B": 256, "RM": rm,
             "RMP2": _next_pow2(rm), "ROUNDING": rounding, "QUAD_RNG": quad, "ROUNDS": 10}
    for rounding, outliers in itertools.product((0, 1, 2), (False, True)):
        yield f"lion 3d r{rounding} outliers={outliers}", tk.lion_kernel_3d, LION_3D_ARGS, \
            {"G": 128, "K": 2, "RM": 8, "ROUNDING": rounding, "ROUNDS": 10, "OUTLIERS": outliers, "OB": 64}
    # training's path: the gradient norm (fp32) is the finite flag
    yield "lion 3d r0 outliers ok=norm", tk.lion_kernel_3d, {**LION_3D_ARGS, "ok_ptr": "*fp32"}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True}
    # the benchmark's shorter Philox (bench/lion_bandwidth.py sweeps philox_rounds)
    yield "lion 3d r0 outliers ok=norm rounds=7", tk.lion_kernel_3d, {**LION_3D_ARGS, "ok_ptr": "*fp32"}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 7, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True}
    # the fused flow's clipping budget, applied on the device from the norm
    yield "lion 3d r0 outliers ok=norm clip", tk.lion_kernel_3d, {**LION_3D_ARGS, "ok_ptr": "*fp32"}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True,
         "CLIP": True}
    yield "lion 2pass G96 r0 ok=norm clip", tk.lion_kernel, {**LION_ARGS, "ok_ptr": "*fp32"}, \
        {"G": 96, "GP2": 128, "RW": 32, "RWP2": 32, "B": 256, "RM": 12, "RMP2": 16, "ROUNDING": 0, "QUAD_RNG": True,
         "ROUNDS": 10, "OK_FLOAT": True, "CLIP": True}
    yield "lion 2pass G96 r0 ok=norm", tk.lion_kernel, {**LION_ARGS, "ok_ptr": "*fp32"}, \
        {"G": 96, "GP2": 128, "RW": 32, "RWP2": 32, "B": 256, "RM": 12, "RMP2": 16, "ROUNDING": 0, "QUAD_RNG": True,
         "ROUNDS": 10, "OK_FLOAT": True}

    # int4 momentum (M4: packed two per byte, a uint8 buffer): both layouts, training's flags, EF and RTN
    m4 = {"m_ptr": "*u8", "ok_ptr": "*fp32"}
    yield "lion 3d r0 outliers ok=norm clip m4", tk.lion_kernel_3d, {**LION_3D_ARGS, **m4}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True,
         "CLIP": True, "M4": True}
    # the byte-tile variant (M4_VEC: bench/lion_bandwidth.py's M4_VEC_SWEEP), SR with the norm flag and EF
    yield "lion 3d r0 outliers ok=norm clip m4 vec", tk.lion_kernel_3d, {**LION_3D_ARGS, **m4}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True,
         "CLIP": True, "M4": True, "M4_VEC": True}
    # the outlier indices kept across the barrier (KEEP_OUTLIERS: KEEP_OUTLIERS_SWEEP), int8 EF, int4 SR
    yield "lion 3d r2 outliers keep", tk.lion_kernel_3d, LION_3D_ARGS, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 2, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "KEEP_OUTLIERS": True}
    yield "lion 3d r0 outliers ok=norm clip m4 vec keep", tk.lion_kernel_3d, {**LION_3D_ARGS, **m4}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True,
         "CLIP": True, "M4": True, "M4_VEC": True, "KEEP_OUTLIERS": True}
    yield "lion 3d r2 m4 vec", tk.lion_kernel_3d, {**LION_3D_ARGS, "m_ptr": "*u8"}, \
        {"G": 128, "K": 2, "RM": 1, "ROUNDING": 2, "ROUNDS": 10, "M4": True, "M4_VEC": True}
    yield "lion 3d r2 outliers m4", tk.lion_kernel_3d, {**LION_3D_ARGS, "m_ptr": "*u8"}, \
        {"G": 128, "K": 2, "RM": 8, "ROUNDING": 2, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "M4": True}
    yield "lion 2pass G96 r0 ok=norm clip m4", tk.lion_kernel, {**LION_ARGS, **m4}, \
        {"G": 96, "GP2": 128, "RW": 32, "RWP2": 32, "B": 256, "RM": 12, "RMP2": 16, "ROUNDING": 0, "QUAD_RNG": True,
         "ROUNDS": 10, "OK_FLOAT": True, "CLIP": True, "M4": True}
    yield "lion 2pass G96 r1 quad=False m4", tk.lion_kernel, {**LION_ARGS, "m_ptr": "*u8"}, \
        {"G": 96, "GP2": 128, "RW": 32, "RWP2": 32, "B": 256, "RM": 12, "RMP2": 16, "ROUNDING": 1, "QUAD_RNG": False,
         "ROUNDS": 10, "M4": True}

    # the other random bits per element (RAND_BITS 32 and 8; 16 is the default above), training's flags
    for rand_bits, m4 in itertools.product((32, 8), (False, True)):
        yield f"lion 3d r0 outliers ok=norm clip bits={rand_bits}{' m4' if m4 else ''}", tk.lion_kernel_3d, \
            {**LION_3D_ARGS, "ok_ptr": "*fp32", **({"m_ptr": "*u8"} if m4 else {})}, \
            {"G": 128, "K": 2, "RM": 8, "ROUNDING": 0, "ROUNDS": 10, "OUTLIERS": True, "OB": 64, "OK_FLOAT": True,
             "CLIP": True, "M4": m4, "RAND_BITS": rand_bits}
    yield "lion 2pass G96 r2 bits=8", tk.lion_kernel, LION_ARGS, \
        {"G": 96, "GP2": 128, "RW": 32, "RWP2": 32, "B": 256, "RM": 12, "RMP2": 16, "ROUNDING": 2, "QUAD_RNG": True,
         "ROUNDS": 10, "RAND_BITS": 8}
    yield "lion 2pass G96 r0 quad=False bits=32", tk.lion_kernel, LION_ARGS, \
        {"G": 96, "GP2": 128, "RW": 32, "RWP2": 32, "B": 256, "RM": 12, "RMP2": 16, "ROUNDING": 0, "QUAD_RNG": False,
         "ROUNDS": 10, "RAND_BITS": 32}


def compile_sm90(kernel, sig, const, num_warps=4):
    """Compile one configuration for an H100 as the JIT would at run time."""
    # constexprs left to their defaults (ROUNDS, OK_FLOAT, ...) must be named too: unnamed, they are
    # runtime arguments of no type and the compile fails
    const = {**{k: p.default for k, p in kernel.signature.parameters.items()
                if p.default is not p.empty and k not in sig}, **const}
    # as the JIT specialises at run time: pointers 16-byte aligned, n and m_bytes multiples of 16 (vectorised code)
    names = list(kernel.signature.parameters)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
             if t.startswith("*") or k in ("n", "m_bytes")}
    src = triton.compiler.ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in const}},
                                    constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def main() -> int:
    failed = 0
    for name, kernel, sig, const in configs():
        try:
            compile_sm90(kernel, sig, const)
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported per configuration, the test fails on any
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
