"""Triton backend. Its kernels are not written yet (GPU issue); until they are, asking for it is an
error, never a silent fallback to the reference."""
from __future__ import annotations


def is_compatible(device="cpu") -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return False, "this version of qft_ds ships no Triton kernels yet; the torch reference runs on CUDA too"
