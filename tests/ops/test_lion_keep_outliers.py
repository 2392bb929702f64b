"""The one-tile Lion kernel with the chunk's first outliers kept in registers across the barrier
(keep_outliers, constexpr KEEP_OUTLIERS) against today's outlier loops: the same bits, every output, for
chunks holding more than one block of outliers (the loops' remainder), exactly one block, one, and none.

Inputs are fresh random draws (the seed is in every message). Kernels run interpreted on the CPU, compiled
with CUDA."""
import pytest
import torch

from qft_ds.ops import reference as ref

SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh per run; printed on failure
CHUNK, OB = 2048, 64  # triton_backend's default chunk, lion_kernel_3d's outlier block


def _inputs(momentum_bits, seed_offset):
    """Five chunks and a partial one: 100 outliers in chunk 0 (two blocks), 64 in chunk 1 (one, full), none in
    chunk 2, one in chunk 3 (at its last element), 1% in the rest, the tensor's last element."""
    g = torch.Generator().manual_seed(SEED + seed_offset)
    n = 5 * CHUNK + 3 * 128 + 1
    wc, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, 128)
    mc, ms = ref.quantize_momentum(torch.randn(n, generator=g) * 1e-3, 256, ref.rng_key(SEED, 0, 1), 0,
                                   bits=momentum_bits)
    pick = lambda lo, hi, k: lo + torch.randperm(hi - lo, generator=g)[:k]  # noqa: E731
    idx = torch.cat([pick(0, CHUNK, 100), pick(CHUNK, 2 * CHUNK, OB), torch.tensor([4 * CHUNK - 1]),
                     pick(4 * CHUNK, n, (n - 4 * CHUNK) // 100), torch.tensor([n - 1])])
    idx = torch.unique(idx).to(torch.int32)
    wc[idx.long()] = 0  # the hybrid invariant: an outlier's dense code is 0
    val = torch.randn(idx.numel(), generator=g) * 0.05
    return [wc, ws, mc, ms, torch.randn(n, generator=g) * 1e-2], idx, val


def _step(be, inputs, idx, val, dev, rounding, finite=None, **kw):
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    res = torch.zeros_like(wc) if rounding == "ef" else None
    v = val.clone().to(dev)
    be.lion_step(wc, ws, 128, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
                 rounding=rounding, seed=SEED, step=3, offset=2048, outlier_idx=idx.to(dev), outlier_val=v,
                 residual=res, grad_scale=0.5, layout="3d", fused_outliers=True, chunk=CHUNK,
                 finite=None if finite is None else finite.to(dev), **kw)
    return [t.cpu() if t is not None else None for t in (wc, ws, mc, ms, res, v)]


@pytest.mark.parametrize("rounding", ["sr", "ef"])
@pytest.mark.parametrize("momentum", [dict(momentum_bits=8), dict(momentum_bits=4, m4_vec=False),
                                      dict(momentum_bits=4, m4_vec=True)], ids=["int8", "int4", "int4_vec"])
@pytest.mark.parametrize("rand_bits", [32, 8])
def test_keep_outliers_writes_todays_bits(tb, rounding, momentum, rand_bits):
    be, dev = tb
    inputs, idx, val = _inputs(momentum["momentum_bits"], seed_offset=rand_bits)
    assert (idx < CHUNK).sum() > OB and ((idx >= CHUNK) & (idx < 2 * CHUNK)).sum() == OB
    old = _step(be, inputs, idx, val, dev, rounding, rand_bits=rand_bits, keep_outliers=False, **momentum)
    new = _step(be, inputs, idx, val, dev, rounding, rand_bits=rand_bits, keep_outliers=True, **momentum)
    for name, a, b in zip(("w", "ws", "m", "ms", "carry", "outliers"), old, new):
        assert (a is None and b is None) or torch.equal(a, b), (SEED, name)
    assert (new[0][idx.long()] == 0).all() and not torch.equal(new[5], val), SEED  # zeroed, and stepped
    if rounding == "ef":
        assert (new[4][idx.long()] == 0).all() and (new[4] != 0).float().mean() > 0.5, SEED


def test_keep_outliers_writes_nothing_for_a_non_finite_norm_and_needs_fused_outliers(tb):
    be, dev = tb
    inputs, idx, val = _inputs(8, seed_offset=1)
    skip = _step(be, inputs, idx, val, dev, "sr", finite=torch.tensor(float("inf")), keep_outliers=True)
    for a, b in zip(skip[:4], inputs[:4]):
        assert torch.equal(a, b), SEED
    assert torch.equal(skip[5], val)
    wc, ws, mc, ms, grad = (t.to(dev) for t in inputs)
    with pytest.raises(ValueError, match="keep_outliers needs fused_outliers"):
        be.lion_step(wc, ws, 128, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                     rounding="sr", seed=0, step=0, offset=0, outlier_idx=idx.to(dev), outlier_val=val.to(dev),
                     layout="2pass", keep_outliers=True)
