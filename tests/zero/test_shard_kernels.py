"""ZeRO rests on one property of the Lion kernel: updating a weight slice by slice, each with its own
element offset, its scale blocks and its outliers, writes the bits one whole-weight update writes."""
import pytest
import torch

from qft_ds.ops import get_ops, is_compatible
from qft_ds.ops import reference as ref
from qft_ds.zero.partition import Partition, outlier_bounds

BACKENDS = ["torch"] + (["triton"] if is_compatible("triton", "cpu")[0] else [])


def _state(n, group, block, g):
    w, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, group)
    m, ms = ref.quantize_blockwise(torch.randn(n, generator=g) * 1e-3, block)
    idx = torch.randperm(n, generator=g)[: n // 50].sort().values.to(torch.int32)
    return [w, ws, m, ms, idx, torch.randn(len(idx), generator=g) * 0.1, torch.zeros(n, dtype=torch.int8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rounding", ["sr", "ef"])
def test_slices_update_like_the_whole_weight(backend, rounding):
    ops, n, group, block, world = get_ops(backend, "cpu"), 96 * 64, 96, 64, 3
    g = torch.Generator().manual_seed(0)
    whole = _state(n, group, block, g)
    sliced = [t.clone() for t in whole]
    grad = torch.randn(n, generator=g) * 0.01
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding=rounding, seed=3, step=5)
    w, ws, m, ms, idx, val, res = whole
    ops.lion_step(w, ws, group, m, ms, block, grad, offset=1000, outlier_idx=idx, outlier_val=val,
                  residual=res if rounding == "ef" else None, **kw)
    w, ws, m, ms, idx, val, res = sliced
    part = Partition(n, group, block, world, 0)
    obounds = outlier_bounds(idx, part.bounds)
    for (lo, hi), (sa, sb), (ma, mb), (oa, ob) in zip(part.bounds, part.scale_bounds(group), part.scale_bounds(block),
                                                      obounds):
        ops.lion_step(w[lo:hi], ws[sa:sb], group, m[lo:hi], ms[ma:mb], block, grad[lo:hi], offset=1000 + lo,
                      outlier_idx=idx[oa:ob] - lo, outlier_val=val[oa:ob],
                      residual=res[lo:hi] if rounding == "ef" else None, **kw)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_slices_update_like_the_whole_weight(backend, monkeypatch):
    """The same with int4 momentum, whose default Triton kernel loads and stores the packed bytes as whole
    tiles (m4_vec, chosen when a slice's packed momentum is exactly its own): slices cut on block
    boundaries (even) and a short last slice, each with its own offset, write the whole update's bits."""
    ops, n, group, block, world = get_ops(backend, "cpu"), 96 * 64 + 128, 64, 128, 3
    launched = []  # (m4_vec, keep_outliers) of each Triton launch
    if backend == "triton":
        from qft_ds.ops import triton_backend
        real = triton_backend._launch_3d
        monkeypatch.setattr(triton_backend, "_launch_3d", lambda *a, **k: (launched.append(a[-2:]), real(*a, **k))[1])
    g = torch.Generator().manual_seed(1)
    w, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, group)
    m, ms = ref.quantize_momentum(torch.randn(n, generator=g) * 1e-3, block, ref.rng_key(3, 0, 1), 1024, bits=4)
    idx = torch.randperm(n, generator=g)[: n // 50].sort().values.to(torch.int32)
    w[idx.long()] = 0
    whole = [w, ws, m, ms, torch.randn(len(idx), generator=g) * 0.1]
    sliced = [t.clone() for t in whole]
    grad = torch.randn(n, generator=g) * 0.01
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=3, step=5, momentum_bits=4)
    w, ws, m, ms, val = whole
    ops.lion_step(w, ws, group, m, ms, block, grad, offset=1024, outlier_idx=idx, outlier_val=val, **kw)
    w, ws, m, ms, val = sliced
    part = Partition(n, group, block, world, 0)
    assert len({hi - lo for lo, hi in part.bounds}) > 1  # uneven slices: 17, 16 and 16 blocks
    obounds = outlier_bounds(idx, part.bounds)
    for (lo, hi), (sa, sb), (ma, mb), (oa, ob) in zip(part.bounds, part.scale_bounds(group), part.scale_bounds(block),
                                                      obounds):
        ops.lion_step(w[lo:hi], ws[sa:sb], group, m[lo // 2:hi // 2], ms[ma:mb], block, grad[lo:hi],
                      offset=1024 + lo, outlier_idx=idx[oa:ob] - lo, outlier_val=val[oa:ob], **kw)
    for name, a, b in zip(("w", "ws", "m", "ms", "outliers"), whole, sliced):
        assert torch.equal(a, b), name
    assert backend != "triton" or launched == [(True, True)] * (1 + world)  # the whole weight, then each slice
