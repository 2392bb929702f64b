"""qft_ds.ops: kernels behind one dispatcher.

`reference.py` holds the PyTorch maths for every op; device backends register faster kernels against
the same op names. `get_ops(backend, device)` resolves a backend, and a backend that was asked for by
name but cannot run here raises: there is no silent fallback.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace

from . import reference

OP_NAMES = ("quantize_blockwise", "dequantize_blockwise", "dequantize_hybrid", "uniform", "lion_step",
            "lion_step_fp32", "lion_step_fp32_foreach")


@dataclass
class BackendInfo:
    name: str
    module: str  # module that defines the ops and an `is_compatible(device) -> (bool, reason)`


BACKENDS = {
    "torch": BackendInfo("torch", "qft_ds.ops.reference"),
    "triton": BackendInfo("triton", "qft_ds.ops.triton_backend"),
}


def is_compatible(backend: str, device="cpu") -> tuple[bool, str]:
    """Whether `backend` can run on `device`, and why not (like a DeepSpeed OpBuilder)."""
    if backend == "torch":
        return True, "pure PyTorch reference, runs on every device"
    try:
        mod = importlib.import_module(BACKENDS[backend].module)
    except ImportError as e:  # triton missing, or its kernels failed to import
        return False, f"cannot import: {e}"
    return mod.is_compatible(device)


def resolve_backend(backend: str = "auto", device="cpu") -> str:
    """The backend `get_ops` runs for `backend` ('auto' | 'torch' | 'triton') on `device`; a ValueError
    naming `qft.backend` if the one asked for cannot run there (a config error: train.py checks it when it
    reads the config, before any model loads)."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"qft.backend: unknown backend {backend!r}; choose auto, torch or triton")
    if backend == "auto":  # Triton on CUDA when it can run; never the (slow) interpreter by default
        ok = str(device).startswith("cuda") and is_compatible("triton", device)[0]
        backend = "triton" if ok else "torch"
    ok, why = is_compatible(backend, device)
    if not ok:
        raise ValueError(f"qft.backend={backend!r} was requested but cannot run on {device}: {why}. "
                         "Use \"backend\": \"torch\" (the PyTorch reference) or \"auto\".")
    return backend


def get_ops(backend: str = "auto", device="cpu") -> SimpleNamespace:
    """The op table for `backend` ('auto' | 'torch' | 'triton') on `device` (resolve_backend)."""
    backend = resolve_backend(backend, device)
    table = {n: getattr(reference, n) for n in OP_NAMES}
    if backend != "torch":
        mod = importlib.import_module(BACKENDS[backend].module)
        table.update({n: getattr(mod, n) for n in OP_NAMES if hasattr(mod, n)})
    return SimpleNamespace(backend=backend, **table)


_configured = "auto"
_tables: dict = {}


def configure(backend: str) -> None:
    """Select the backend that modules use for their own ops (qft_ds.initialize sets it from the config)."""
    global _configured
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"qft.backend: unknown backend {backend!r}; choose auto, torch or triton")
    _configured = backend
    _tables.clear()


def current(device) -> SimpleNamespace:
    """The op table of the configured backend for `device` (cached per device type)."""
    key = torch_device_type(device)
    if key not in _tables:
        _tables[key] = get_ops(_configured, device)
    return _tables[key]


def torch_device_type(device) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def report(device="cpu") -> list[tuple[str, bool, str]]:
    return [(name, *is_compatible(name, device)) for name in BACKENDS]
