"""bench/lion_ncu.py (the Nsight Compute driver) on the CPU, its kernel interpreted: the GPU call must not
be the first to run it. It must launch the training kernel for real: the weights, the momentum and the
outliers change."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_driver_runs_the_training_kernel(bits, monkeypatch):
    import lion_ncu
    from qft_ds.ops import reference as ref, triton_backend
    if not triton_backend.is_compatible("cpu")[0]:
        pytest.skip("the triton interpreter is off (TRITON_INTERPRET)")
    calls = []
    real = triton_backend.lion_step
    monkeypatch.setattr(triton_backend, "lion_step", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    # the state before: the same seeded draws as the driver's
    g = torch.Generator().manual_seed(0)
    w0, _ = ref.quantize_blockwise(torch.randn(4096, generator=g) * 0.02, 128)
    args = ["--device", "cpu", "--n", "4096", "--momentum_bits", str(bits)]
    assert torch.equal(lion_ncu.main(args + ["--launches", "0"])["w"], w0)  # the same draws
    out = lion_ncu.main(args + ["--launches", "2"])
    assert len(calls) == 2 and all(k["momentum_bits"] == bits and k["outlier_idx"] is not None for k in calls)
    assert not torch.equal(out["w"], w0)  # two Lion steps of lr 1e-5 move some int8 codes
    assert out["outlier_val"].abs().sum() > 0
