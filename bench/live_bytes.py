"""A live-tensor accountant: every storage torch creates while it is active, alive until torch frees it,
labelled by where it was made, with the composition of the live set at its peak.

Like bench/logits_probe.py (a TorchDispatchMode: CPU autograd runs backward in the calling thread, so
backward's ops are seen too) but for every tensor, and keyed on storages: a weakref finalizer on the
storage fires when its last tensor or view dies, whoever held it (autograd's saved tensors included).
Storages that existed before (the model's int8 state) are not counted: the caller adds them.

Each storage gets a label when it is made:
- `phase`: set by the caller (forward, backward, step), refined from the Python stack: "norm pass" inside
  the optimizer's norm-only backward, "recompute" inside a checkpointed layer's recompute;
- `site`: the innermost frame of qft_ds or transformers (file:function), else the autograd engine's C++
  backward ops (`autograd`), else `torch`;
- `kernel`: made inside a device kernel's CPU stand-in (qft_ds/ops/reference.py, chunked_loss.add_mm_fp32's
  CPU branch). The GPU's Triton / cuBLAS kernels make no such temporaries, so a second count ("device")
  leaves them out until a tensor made there is read outside (a kernel's output): that count's peak and
  composition are what the GPU would see.
"""
from __future__ import annotations

import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_KERNEL_SITES = ("qft_ds/ops/reference.py", "ops/reference.py:", "chunked_loss.py:add_mm_fp32")


@dataclass
class Alloc:
    nbytes: int
    shape: tuple
    dtype: str
    op: str
    phase: str
    site: str
    kernel: bool  # a CPU stand-in's temporary, not counted on the device until read outside a kernel


def _stack_labels() -> tuple[str, bool, bool, bool]:
    """(site, inside a kernel stand-in, inside the norm pass, inside a checkpoint's recompute/backward)."""
    f = sys._getframe(2)
    site = None
    kernel = norm = recompute = False
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        name = f.f_code.co_name
        here = f"{path.rsplit('/', 1)[-1]}:{getattr(f.f_code, 'co_qualname', name)}"
        if any(k in f"{path}:{name}" for k in _KERNEL_SITES):
            kernel = True
        if name == "_norm_pass":
            norm = True
        if path.endswith("torch/utils/checkpoint.py") and name in ("backward", "recompute_fn", "unpack_hook"):
            recompute = True
        if site is None:
            if "/qft_ds/" in path or "/transformers/" in path:
                site = here
            elif path.endswith(("torch/autograd/__init__.py", "torch/autograd/graph.py")):
                site = "autograd"
        f = f.f_back
    return site or "torch", kernel, norm, recompute


class LiveBytes(TorchDispatchMode):
    """`select(Alloc) -> bool`: count only the storages it accepts (default all)."""

    def __init__(self, select=None):
        super().__init__()
        self.select = select
        self.phase = "setup"
        self.live: dict[int, Alloc] = {}    # storage data_ptr -> its record
        self.total = {"all": 0, "device": 0}
        self.peak = {"all": 0, "device": 0}
        self.at_peak = {"all": [], "device": []}  # the live records at each count's peak
        self.phase_peak = defaultdict(int)   # phase -> device count's peak inside it
        self.at_phase_peak = {}              # phase -> the live records (device count) at that peak

    # -- the counts --------------------------------------------------------------------------------------
    def _counts(self, a: Alloc) -> tuple[str, ...]:
        return ("all",) if a.kernel else ("all", "device")

    def _add(self, ptr: int, a: Alloc) -> None:
        self.live[ptr] = a
        for c in self._counts(a):
            self.total[c] += a.nbytes
        self._check_peaks(a.phase)

    def _check_peaks(self, phase: str) -> None:
        for c in ("all", "device"):
            if self.total[c] > self.peak[c]:
                self.peak[c] = self.total[c]
                self.at_peak[c] = [a for a in self.live.values() if c == "all" or not a.kernel]
        if self.total["device"] > self.phase_peak[phase]:
            self.phase_peak[phase] = self.total["device"]
            self.at_phase_peak[phase] = [a for a in self.live.values() if not a.kernel]

    def _free(self, ptr: int) -> None:
        a = self.live.pop(ptr, None)
        if a is not None:
            for c in self._counts(a):
                self.total[c] -= a.nbytes

    def _escape(self, ptr: int, phase: str) -> None:
        """A kernel stand-in's tensor read outside a kernel is that kernel's output: it exists on the device."""
        a = self.live.get(ptr)
        if a is not None and a.kernel:
            a.kernel = False
            self.total["device"] += a.nbytes
            self._check_peaks(phase)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        site, kernel, norm, recompute = _stack_labels()
        phase = self.phase + (" (norm pass)" if norm else "") + (" (checkpointed layer)" if recompute else "")
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        if not kernel:
            for ptr in inputs:
                self._escape(ptr, phase)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue  # a view or an in-place result, or nothing
            a = Alloc(storage.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""),
                      str(func.overloadpacket.__name__), phase, site, kernel)
            if self.select is None or self.select(a):
                self._add(ptr, a)
                weakref.finalize(storage, self._free, ptr)
        return out

    # -- reading it ----------------------------------------------------------------------------------------
    def composition(self, count: str = "device", classify=None, phase: str | None = None) -> dict:
        """{label: [bytes, storages]} of what was alive at `count`'s peak (or at the device count's peak
        inside `phase`), largest first; `classify(Alloc) -> label` (default: dtype, shape, phase, site)."""
        classify = classify or (lambda a: f"{a.dtype} {list(a.shape)} | {a.phase} | {a.site}")
        parts = defaultdict(lambda: [0, 0])
        for a in self.at_peak[count] if phase is None else self.at_phase_peak[phase]:
            part = parts[classify(a)]
            part[0] += a.nbytes
            part[1] += 1
        return dict(sorted(parts.items(), key=lambda kv: -kv[1][0]))

    def peak_moment(self, count: str = "device") -> str:
        """The phase and site of the allocation that set the peak (the last record taken)."""
        recs = self.at_peak[count]
        if not recs:
            return "nothing allocated"
        last = recs[-1]  # dicts keep insertion order: the newest live storage
        return f"{last.phase} | {last.site} | {last.op} -> {last.dtype} {list(last.shape)}"
