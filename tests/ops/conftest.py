"""Fixtures of the kernel tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def tb():
    """The triton backend: compiled on CUDA, else interpreted (the top conftest sets TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from qft_ds.ops import triton_backend
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok, why = triton_backend.is_compatible(dev)
    if not ok:
        pytest.skip(why)
    return triton_backend, dev
