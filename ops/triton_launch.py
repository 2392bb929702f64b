"""Launch compiled Triton kernels without the JIT's per-call Python work.

The training step is host-bound (bench/NOTES.md) and launches ~270 Triton kernels per 1.1B step. A launch
through `kernel[grid](...)` binds every argument, asks Triton's specializer about each, hashes a cache
key and checks the kernel's globals: tens of microseconds for a kernel with ~25 arguments. `Launcher`
keeps the compiled kernel the JIT returned and launches it directly (`CompiledKernel[grid](*args)`,
Triton's public launch of a compiled kernel) when the arguments specialize the same way.

The cache key is at least as fine as Triton's specialization, so a kernel compiled for one case never
runs another: per tensor its dtype and whether its address is 16-byte aligned; per int whether it is 1,
whether it divides by 16 and its integer width; per bool its value; floats are never specialized; the
constexprs and num_warps by value. An argument of any other type goes through the JIT, every time.
Interpreted kernels (TRITON_INTERPRET=1) and QFT_DS_TRITON_LAUNCH=jit go through the JIT.
"""
from __future__ import annotations

import os

import torch

# "direct" (default) or "jit"; read at each launch through the module attribute, so a benchmark can
# compare both in one process
MODE = os.environ.get("QFT_DS_TRITON_LAUNCH", "direct")
if MODE not in ("direct", "jit"):
    raise ValueError(f"QFT_DS_TRITON_LAUNCH must be 'direct' or 'jit', got {MODE!r}")


def _int_spec(v: int):
    width = 32 if -2**31 <= v < 2**31 else (65 if v >= 2**63 else 64)
    return (v == 1, v % 16 == 0, width)


def _tensor_spec(t: torch.Tensor):
    return (t.dtype, t.data_ptr() % 16 == 0)


_SPEC = {
    torch.Tensor: _tensor_spec,
    torch.nn.Parameter: _tensor_spec,
    bool: lambda b: ("b", b),
    int: _int_spec,
    float: lambda f: "f",
}


class Launcher:
    """`Launcher(jit_fn)(grid, *args, num_warps=4, **constexprs)` does what `jit_fn[grid](*args, num_warps=...,
    **constexprs)` does. `args` are the kernel's runtime arguments in order; its constexprs come after them
    (as in every kernel of ops/triton_kernels.py) and are passed by name, defaults filled in."""

    def __init__(self, jit_fn):
        self.fn = jit_fn
        self.jit_only = not hasattr(jit_fn, "params")  # an interpreted kernel: nothing compiled to keep
        params = getattr(jit_fn, "params", [])
        self.n_runtime = sum(not p.is_constexpr for p in params)
        if any(p.is_constexpr for p in params[:self.n_runtime]):
            raise ValueError(f"{jit_fn.__name__}: constexpr parameters must come after the runtime ones")
        self.constexprs = [(p.name, p.default) for p in params[self.n_runtime:]]
        self._compiled = {}

    def __call__(self, grid, *args, num_warps: int = 4, **constexprs):
        if MODE == "jit" or self.jit_only:
            return self.fn[grid](*args, num_warps=num_warps, **constexprs)
        try:
            spec = tuple([_SPEC[type(a)](a) for a in args])
        except KeyError:  # an argument type the key does not cover: Triton specializes it
            return self.fn[grid](*args, num_warps=num_warps, **constexprs)
        values = tuple([constexprs.get(name, default) for name, default in self.constexprs])
        key = (spec, values, num_warps, torch.cuda.current_device())
        compiled = self._compiled.get(key)
        if compiled is None:  # compile (or find in Triton's cache) and launch through the JIT, once
            if len(constexprs) != sum(name in constexprs for name, _ in self.constexprs):
                raise TypeError(f"{self.fn.__name__}: unknown constexpr in {sorted(constexprs)}")
            compiled = self.fn[grid](*args, num_warps=num_warps, **constexprs)
            if hasattr(compiled, "result"):  # Triton's async compile mode hands back a future
                compiled = compiled.result()
            self._compiled[key] = compiled
            return compiled
        grid = tuple(grid) + (1,) * (3 - len(grid))
        compiled[grid](*args, *values)
        return compiled
