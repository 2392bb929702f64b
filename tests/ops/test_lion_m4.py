"""int4 Lion momentum ("qft": {"momentum_bits": 4}): the packed format, and the Triton kernels (M4) against
their PyTorch reference twin (reference.lion_step with momentum_bits=4).

Inputs are fresh random draws (the seed is in every message): the bounds below hold for any draw, except
the bias checks, which are 6-sigma bounds. Kernels run interpreted on the CPU, compiled with CUDA."""
import inspect

import pytest
import torch

from qft_ds.ops import reference as ref

SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh per run; printed on failure


def _inputs(n, wblock, seed_offset=0):
    g = torch.Generator().manual_seed(SEED + seed_offset)
    wc, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, wblock)
    m0 = torch.randn(n, generator=g) * 1e-3
    mc, ms = ref.quantize_momentum(m0, 256, ref.rng_key(SEED, 0, ref.STREAM_MOMENTUM), 0, bits=4)
    grad = torch.randn(n, generator=g) * 1e-2
    return [wc, ws, mc, ms, grad]


def _step(fn, dev, inputs, wblock, rounding="sr", idx=None, val=None, grad_scale=0.5, **kw):
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    res = torch.zeros_like(wc) if rounding == "ef" else None
    val = None if val is None else val.clone().to(dev)
    fn(wc, ws, wblock, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding=rounding,
       seed=0, step=3, offset=1000, outlier_idx=None if idx is None else idx.to(dev), outlier_val=val,
       residual=res, grad_scale=grad_scale, momentum_bits=4, **kw)
    return [t.cpu() if t is not None else None for t in (wc, ws, mc, ms, res, val)]


def _outliers(inputs, n):
    idx = torch.tensor([0, 3, n // 4, n // 2 - 1, n // 2, n - 1], dtype=torch.int32)  # chunk edges, the tail
    inputs[0][idx.long()] = 0  # the hybrid invariant: an outlier's dense code is 0
    return idx, torch.linspace(-0.5, 0.5, len(idx))


# -- the format (reference) ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [16, 17, 1001])
def test_int4_packing_round_trips_every_code(n):
    codes = torch.arange(n) % 16 - 8  # every nibble value, at both halves of a byte
    packed = ref.pack_int4(codes.to(torch.int8))
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 2)
    assert torch.equal(ref.unpack_int4(packed, n), codes.to(torch.int8))
    assert torch.equal(ref.pack_int4(torch.zeros(n, dtype=torch.int8)), torch.zeros(-(-n // 2), dtype=torch.uint8))
    scales = torch.rand(-(-n // 8)) + 0.1
    idx = torch.arange(0, n, 3, dtype=torch.int32)
    want = ref.dequantize_momentum(packed, scales, 8, n, bits=4)[idx.long()]
    assert torch.equal(ref.momentum_at(packed, scales, 8, idx, bits=4), want)


def test_int4_momentum_rounding_is_unbiased_within_one_step():
    """quantize_momentum(bits=4): codes in [-7, 7], scale absmax / 7, every value within one step of its
    code, and the mean over draws converges to the value (stochastic rounding)."""
    n, draws = 4096, 64
    x = torch.randn(n, generator=torch.Generator().manual_seed(SEED)) * 1e-3
    acc = torch.zeros(n, dtype=torch.float64)
    for k in range(draws):
        codes, scales = ref.quantize_momentum(x, 256, ref.rng_key(SEED, k, 1), 0, bits=4)
        q = ref.unpack_int4(codes, n)
        assert q.abs().max() <= 7 and (q.abs() == 7).any()
        assert torch.allclose(scales, ref.absmax_scales(x, 256, qmax=7))
        m = ref.dequantize_momentum(codes, scales, 256, n, bits=4)
        s = scales.repeat_interleave(256)
        assert ((m - x).abs() <= s * (1 + 1e-6)).all(), SEED
        acc += m.double()
    err = (acc / draws - x.double()) / s.double()
    assert (err.abs() <= 6 * 0.5 / draws**0.5).all(), SEED  # per element: SR variance <= 1/4 step^2


def test_momentum_bits_are_checked():
    with pytest.raises(ValueError, match="momentum_bits must be 4 or 8"):
        ref.quantize_momentum(torch.zeros(8), 8, 0, 0, bits=2)


# -- the kernels against the reference -------------------------------------------------------------
LAYOUTS = [(128, "3d"), (128, "2pass"), (96, "2pass")]


@pytest.mark.parametrize("wblock,layout", LAYOUTS)
def test_lion_m4_kernel_matches_reference(tb, wblock, layout):
    """Weights rounded to nearest (the same function in both; SR draws differ by generator): the same codes,
    scales and exact outliers. Momentum: both within one int4 step of the exact fp32 EMA, unbiased, with the
    same block scales; a partial, odd-length tail included."""
    be, dev = tb
    n = 8192 + 3 * 128 + 1  # odd: the last byte holds one code and a zero pad
    inputs = _inputs(n, wblock)
    idx, val = _outliers(inputs, n)
    k = _step(lambda *a, **kw: be.lion_step(*a, layout=layout, **kw), dev, inputs, wblock, "rtn", idx, val)
    r = _step(ref.lion_step, "cpu", inputs, wblock, "rtn", idx, val)
    assert torch.allclose(k[1], r[1], rtol=1e-6), SEED                      # weight scales
    assert ((k[0] != r[0]).float().mean() < 1e-3), SEED                     # weight codes: ties only
    assert torch.allclose(k[5], r[5], atol=1e-7, rtol=0), SEED              # outliers: exact fp32
    m_exact = 0.99 * ref.dequantize_momentum(inputs[2], inputs[3], 256, n, 4) + 0.01 * 0.5 * inputs[4]
    assert torch.allclose(k[3], r[3], rtol=1e-5, atol=0), SEED              # absmax / 7 (+ the SR margin)
    for out in (k, r):
        assert out[2].dtype == torch.uint8 and out[2].numel() == -(-n // 2)
        assert out[2][-1] >> 4 == 0  # the pad nibble stays 0
        q = ref.unpack_int4(out[2], n)
        assert q.abs().max() <= 7
        s = out[3].repeat_interleave(256)[:n]
        err = ref.dequantize_momentum(out[2], out[3], 256, n, 4) - m_exact
        assert (err.abs() <= s * (1 + 2**-15) + 1e-12).all(), SEED
        assert abs((err / s).mean().item()) < 6 * 0.5 / n**0.5, SEED       # unbiased


@pytest.mark.parametrize("rounding", ["sr", "ef"])
def test_lion_m4_one_tile_kernel_equals_two_pass(tb, rounding):
    """The two kernels draw the same bits: int4 momentum, weights, outliers and carry are bit-identical."""
    be, dev = tb
    n = 8192 + 384
    inputs = _inputs(n, 128, seed_offset=1)
    idx, val = _outliers(inputs, n)
    a = _step(lambda *x, **kw: be.lion_step(*x, layout="2pass", **kw), dev, inputs, 128, rounding, idx, val)
    b = _step(lambda *x, **kw: be.lion_step(*x, layout="3d", fused_outliers=True, **kw), dev, inputs, 128,
              rounding, idx, val)
    for x, y in zip(a[:5], b[:5]):
        assert x is None and y is None or torch.equal(x, y), SEED
    assert torch.allclose(a[5], b[5], rtol=2.5e-7, atol=0)  # compiled: the kernel's FMA vs torch's two roundings


def test_lion_m4_shards_draw_what_the_whole_tensor_draws(tb):
    """A shard cut at a momentum-block boundary (ZeRO's cut) starts on a whole byte and, updated at its
    global offset, writes the whole tensor's bytes."""
    be, dev = tb
    n, wblock, cut = 16_384, 128, 6_144
    inputs = _inputs(n, wblock, seed_offset=2)
    whole = _step(be.lion_step, dev, inputs, wblock)
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    for lo, hi in ((0, cut), (cut, n)):
        be.lion_step(wc[lo:hi], ws[lo // wblock:hi // wblock], wblock, mc[lo // 2:hi // 2], ms[lo // 256:hi // 256],
                     256, grad[lo:hi], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0,
                     step=3, offset=1000 + lo, grad_scale=0.5, momentum_bits=4)
    for x, y in zip(whole[:4], (wc, ws, mc, ms)):
        assert torch.equal(x, y.cpu()), SEED


@pytest.mark.parametrize("layout", ["2pass", "3d"])
def test_lion_m4_clip_budget_and_finite_norm(tb, layout):
    """The int8 kernel's interface: a clipping budget applied on the device from the norm passed as
    `finite` writes what the host-side scale writes; a non-finite norm writes nothing."""
    be, dev = tb
    n = 4096 + 256
    inputs = _inputs(n, 128, seed_offset=3)
    idx, val = _outliers(inputs, n)
    norm = inputs[4].norm().reshape(())
    budget = 0.3 * norm.item()
    fn = lambda *a, **kw: be.lion_step(*a, layout=layout, **kw)  # noqa: E731
    on_device = _step(fn, dev, inputs, 128, "sr", idx, val, clip=budget, finite=norm.to(dev))
    host = _step(fn, dev, inputs, 128, "sr", idx, val, grad_scale=ref.clip_scale(0.5, budget, norm.item()))
    for x, y in zip(on_device, host):
        if x is None:
            continue
        if x.is_floating_point():  # fp32 on the device vs fp64 on the host
            assert torch.allclose(x, y, rtol=1e-5, atol=0), SEED
        else:
            assert (x != y).float().mean() < 2e-3, SEED
    for flag in (torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(False)):
        skip = _step(fn, dev, inputs, 128, "sr", idx, val, finite=flag.to(dev))
        for x, y in zip(skip[:4], inputs[:4]):
            assert torch.equal(x, y)
        assert torch.equal(skip[5], val)


def test_lion_m4_interface_is_the_int8_kernels(tb):
    """One op, one signature: the backend's lion_step takes every reference keyword (momentum_bits
    included), refuses other widths, and an odd block (pairs would straddle blocks, and shards)."""
    be, dev = tb
    want = set(inspect.signature(ref.lion_step).parameters)
    assert want <= set(inspect.signature(be.lion_step).parameters)
    inputs = _inputs(1024, 128, seed_offset=4)
    for fn, d in ((be.lion_step, dev), (ref.lion_step, "cpu")):
        with pytest.raises(ValueError, match="momentum_bits must be 4 or 8"):
            _step(lambda *a, **kw: fn(*a, **{**kw, "momentum_bits": 2}), d, inputs, 128)
    with pytest.raises(ValueError, match="block_size must be even"):
        wc, ws, mc, ms, grad = (t.to(dev) for t in inputs)
        be.lion_step(wc, ws, 128, mc, ms[:1], 255, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                     rounding="sr", seed=0, step=0, offset=0, momentum_bits=4)


@pytest.mark.parametrize("layout", ["3d", "2pass"])
def test_a_group_of_outliers_alone_gets_the_kernels_scale(tb, layout):
    """The last group holds one element, an outlier, with a scale below lr / 127: the kernels' absmax sees
    the slot's -lr*u (no select, for speed) and so does the reference; its dense code stays 0."""
    be, dev = tb
    n = 8192 + 3 * 128 + 1
    inputs = _inputs(n, 128, seed_offset=5)
    idx, val = _outliers(inputs, n)
    inputs[1][-1] = 1e-9  # that group's old scale
    k = _step(lambda *a, **kw: be.lion_step(*a, layout=layout, **kw), dev, inputs, 128, "rtn", idx, val)
    r = _step(ref.lion_step, "cpu", inputs, 128, "rtn", idx, val)
    assert torch.allclose(k[1], r[1], rtol=1e-6), SEED
    assert k[1][-1] > 1e-6 and k[0][-1] == 0 and r[0][-1] == 0, SEED
