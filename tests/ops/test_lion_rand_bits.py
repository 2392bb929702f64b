"""The Lion kernels' random bits per element (rand_bits 16, the default; 32; 8: 4x less Philox work than 32):
the Triton kernels against the PyTorch reference drawing the same Philox bits (reference_rng.py), int8 and
int4 momentum, with outliers; and each rounding's bias at the granularity it claims (2^-16 of a step with a
16-bit addend, 1/256 with 8 bits).

Inputs are fresh random draws (the seed is in every message). Kernels run interpreted on the CPU, compiled
with CUDA."""
import pytest
import torch

from qft_ds.ops import reference as ref
from qft_ds.ops import reference_rng as rr

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from qft_ds.ops import triton_kernels as tk  # noqa: E402
from qft_ds.ops import triton_rng as trng  # noqa: E402

SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh per run; printed on failure


# -- the random stream ----------------------------------------------------------------------------
@triton.jit
def _randint4x_probe(out_ptr, key, base, N: tl.constexpr, ROUNDS: tl.constexpr):
    i = tl.arange(0, N)
    r0, r1, r2, r3 = tl.randint4x(key, base + i.to(tl.int64), ROUNDS)
    tl.store(out_ptr + 4 * i, r0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _bits_probe(out_ptr, tile_ptr, key, base, N: tl.constexpr, RAND_BITS: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, trng._bits(key, base + i, 10, RAND_BITS).to(tl.int64))
    tile = trng._bits_3d(key, base, 2, 2, N // 4, 10, RAND_BITS)
    r = tl.arange(0, 2)
    c = tl.arange(0, N // 4)
    local = (r[None, :, None] * 2 + r[:, None, None]) * (N // 4) + c[None, None, :]  # a [K, R, G] tile
    tl.store(tile_ptr + local, tile.to(tl.int64))


@pytest.mark.parametrize("rounds", [10, 7])
def test_torch_philox_is_tl_randint4x(tb, rounds):
    """reference_rng.philox4x32 draws tl.randint4x's words bit for bit, counters across 2^32 included."""
    _, dev = tb
    out = torch.zeros(4 * 512, dtype=torch.int64, device=dev)
    for key, base in ((ref.rng_key(SEED, 3, 0), 2**32 - 256), (SEED, 0)):
        _randint4x_probe[(1,)](out, key, base, N=512, ROUNDS=rounds)
        want = torch.stack(rr.philox4x32(key, torch.arange(base, base + 512), rounds), dim=1).reshape(-1)
        assert torch.equal(out.cpu(), want), SEED


@pytest.mark.parametrize("rand_bits", [32, 16, 8])
def test_kernel_draws_are_the_reference_draws(tb, rand_bits):
    """Element e gets piece e % P of philox(e // P), both element-wise and in the kernels' tiles."""
    _, dev = tb
    n, base = 512, 16 * 977
    flat = torch.zeros(n, dtype=torch.int64, device=dev)
    tile = torch.zeros(n, dtype=torch.int64, device=dev)
    key = ref.rng_key(SEED, 5, 0)
    _bits_probe[(1,)](flat, tile, key, base, N=n, RAND_BITS=rand_bits)
    want = rr.draws(key, base, n, rand_bits, "cpu")
    assert torch.equal(flat.cpu(), want) and torch.equal(tile.cpu(), want), SEED
    assert want.max() < 2**rand_bits and want.min() >= 0
    with pytest.raises(ValueError, match="rand_bits"):
        rr.draws(key, 0, 4, 12, "cpu")


# -- the rounding rule, over every value of its random bits ---------------------------------------
@triton.jit
def _sr_probe(x_ptr, bits_ptr, amax_ptr, out_ptr, BLOCK: tl.constexpr, HIGH: tl.constexpr, RAND_BITS: tl.constexpr,
              M4: tl.constexpr = False):
    """The kernels' stochastic rounding of x from a draw's weight share (HIGH: the momentum's), with the
    int8 (or, M4, the int4) scale margin of amax."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if M4:
        inv = trng._sr_inv(tl.load(amax_ptr) * tk.SR_PER_QMAX4)
    else:
        inv = trng._sr_inv(tl.load(amax_ptr) * trng.SR_PER_QMAX)
    hw, hm = trng._shares(tl.load(bits_ptr + i).to(tl.uint32, bitcast=True), RAND_BITS)
    tl.store(out_ptr + i, trng._sr_codes(tl.load(x_ptr + i), inv, hm if HIGH else hw))


def _every_share(rand_bits, high):
    """Draws that give a rounding every value of its share once (16 bits, or 8 for rand_bits 8), the
    other share's bits random: (draws, the share's count)."""
    other = torch.randint(0, 2**16, (2**16,), generator=torch.Generator().manual_seed(SEED))
    h = torch.arange(2**16, dtype=torch.int64)
    if rand_bits == 8:
        return torch.arange(256, dtype=torch.int64), 256
    if rand_bits == 16:  # the weight's share is the piece, the momentum's its byte swap: both run over all
        return h, 2**16
    return ((h << 16 | other) if high else (h | other << 16)), 2**16


@pytest.mark.parametrize("rand_bits,high", [(16, False), (16, True), (32, False), (32, True), (8, False), (8, True)])
def test_sr_mean_is_y_on_the_shares_grid(tb, rand_bits, high):
    """Over every value of a rounding's share: the mean code is Y / 2^15 exactly with Y = y * 2^15 rounded
    to nearest (16-bit shares: within 2^-16 of y), or 2Y rounded to a multiple of 2^8 over 2^16 for
    rand_bits 8 (within 1/512 + 2^-16 of y, and a step below that is lost: the option's cost); codes within +-127 with no clamp at the block's
    absmax, both signs (its SR scale is absmax / 127 * (1 + 2^-20)); the other share's bits must not matter."""
    _, dev = tb
    amax = 0.0123
    s = amax * (1 + 2**-20) / 127
    ys = torch.tensor([0.3, -0.3, 1.5, -2.75, 0.0, 3.9999, 1 / 3, -5e-5, 1.5 / 256, 0.4 / 256], dtype=torch.float64)
    xs = torch.cat([(ys * s).float(), torch.tensor([amax, -amax])])
    bits, count = _every_share(rand_bits, high)
    n = len(xs) * count
    out = torch.empty(n, dtype=torch.int8, device=dev)
    _sr_probe[(n // 256,)](xs.repeat_interleave(count).to(dev), bits.repeat(len(xs)).to(torch.uint32).view(torch.int32).to(dev),
                           torch.tensor([amax], device=dev), out, BLOCK=256, HIGH=high, RAND_BITS=rand_bits)
    q = out.cpu().view(len(xs), count).double()
    mean = q.mean(dim=1)
    y = xs.double() / s
    grid = 256 if rand_bits == 8 else 2**15
    big_y = torch.round(y * 2**15)  # half to even, as the FMA onto 1.5 * 2^23
    want = big_y / grid if rand_bits != 8 else torch.floor((2 * big_y + 128) / 256) / 256
    assert torch.allclose(mean[:-2], want[:-2], atol=1e-12), (SEED, mean, want)
    assert ((mean[:-2] - y[:-2]).abs() <= 0.5 / grid + 2**-16 + 1e-9).all()
    if rand_bits == 8:
        assert mean[-3] == 0.0  # a step below 1/512 of the grid is lost
    else:
        assert mean[-3] == want[-3] > 0
    assert q.abs().max() <= 127 and (q[-2] >= 126).all() and (q[-1] <= -126).all()


def test_16_bit_shares_decide_independently_but_on_their_thresholds():
    """rand_bits 16: the weight rounds with the piece p = (a << 8) | b, the momentum with (b << 8) | a. Over
    all 2^16 draws, with both roundings' thresholds set so that each rounds up half the time, the pair's
    joint frequencies differ from independent ones only through the 1/256 threshold buckets."""
    p = torch.arange(2**16, dtype=torch.int64)
    hw, hm = rr.shares(p, 16)
    assert torch.equal(hw.sort().values, p) and torch.equal(hm.sort().values, p)  # each a uniform 16-bit share
    for tw, tm in ((2**15, 2**15), (12345, 54321), (2**15 + 77, 999)):
        up_w, up_m = hw >= tw, hm >= tm
        joint = (up_w & up_m).double().mean()
        indep = up_w.double().mean() * up_m.double().mean()
        assert abs(joint - indep) <= 2 / 256, (tw, tm, joint, indep)


# -- the Lion step: kernels against the reference on the same bits ---------------------------------
def _inputs(n, wblock, momentum_bits, seed_offset):
    g = torch.Generator().manual_seed(SEED + seed_offset)
    wc, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, wblock)
    m0 = torch.randn(n, generator=g) * 1e-3
    mc, ms = ref.quantize_momentum(m0, 256, ref.rng_key(SEED, 0, 1), 0, bits=momentum_bits)
    idx = torch.randperm(n, generator=g)[: n // 100].sort().values.to(torch.int32)  # 1% outliers
    wc[idx.long()] = 0  # the hybrid invariant: an outlier's dense code is 0
    val = torch.randn(idx.numel(), generator=g) * 0.05
    return [wc, ws, mc, ms, torch.randn(n, generator=g) * 1e-2], idx, val


def _step(fn, dev, inputs, idx, val, wblock, rounding, offset, **kw):
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    res = torch.zeros_like(wc) if rounding == "ef" else None
    v = val.clone().to(dev)
    fn(wc, ws, wblock, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding=rounding,
       seed=SEED, step=3, offset=offset, outlier_idx=idx.to(dev), outlier_val=v, residual=res, grad_scale=0.5, **kw)
    return [t.cpu() if t is not None else None for t in (wc, ws, mc, ms, res, v)]


CASES = [  # (weight group, kernel knobs, offset): the one-tile kernel, two-pass, two-pass's element-wise draws
    (128, dict(layout="3d", fused_outliers=True), 2048),
    (96, dict(layout="2pass"), 4608),
    (128, dict(layout="2pass"), 1000),  # offset not a multiple of 16: element-wise draws, the same bits
]


@pytest.mark.parametrize("rand_bits", [16, 8, 32])
@pytest.mark.parametrize("momentum_bits", [8, 4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lion_kernel_matches_the_reference_on_the_same_bits(tb, rand_bits, momentum_bits, case):
    """Stochastic rounding from the same draws: codes equal but for rare flips where the float arithmetic
    rounds differently (the kernel's FMAs against torch's two roundings, at most 1 code), scales within an
    ulp, outliers exact fp32; a partial last block included."""
    be, dev = tb
    wblock, knobs, offset = CASES[case]
    n = 8192 + 3 * 128 + 4
    inputs, idx, val = _inputs(n, wblock, momentum_bits, seed_offset=case)
    k = _step(lambda *a, **kw: be.lion_step(*a, **knobs, **kw), dev, inputs, idx, val, wblock, "sr", offset,
              momentum_bits=momentum_bits, rand_bits=rand_bits)
    r = _step(ref.lion_step, "cpu", inputs, idx, val, wblock, "sr", offset, momentum_bits=momentum_bits,
              rand_bits=rand_bits)
    assert torch.allclose(k[1], r[1], rtol=1e-6, atol=0), SEED          # weight scales
    assert torch.allclose(k[3], r[3], rtol=1e-6, atol=0), SEED          # momentum scales
    assert torch.allclose(k[5], r[5], rtol=2.5e-7, atol=1e-9), SEED     # outliers: one FMA against two roundings
    mk, mr = (ref.momentum_codes(x[2], n, momentum_bits) for x in (k, r))
    for a, b in ((k[0], r[0]), (mk, mr)):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff != 0).float().mean() < 1e-3, (SEED, (diff != 0).sum())
    assert (k[0][idx.long()] == 0).all()
    moved = (k[0] != inputs[0]).float().mean()
    assert moved > 0.05, SEED  # lr 1e-3 is ~0.1-1 of a step here: many codes move, so equality means something


@pytest.mark.parametrize("rand_bits", [16, 8])
def test_error_feedback_carry_matches_the_reference_on_the_same_bits(tb, rand_bits):
    be, dev = tb
    n = 4096 + 256
    inputs, idx, val = _inputs(n, 128, 8, seed_offset=7)
    k = _step(lambda *a, **kw: be.lion_step(*a, layout="3d", **kw), dev, inputs, idx, val, 128, "ef", 0,
              rand_bits=rand_bits)
    r = _step(ref.lion_step, "cpu", inputs, idx, val, 128, "ef", 0, rand_bits=rand_bits)
    for a, b in ((k[0], r[0]), (k[2], r[2]), (k[4], r[4])):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff != 0).float().mean() < 2e-3, SEED
    assert (k[4] != 0).float().mean() > 0.5  # the carry is really written


@pytest.mark.parametrize("rand_bits", [16, 8])
def test_one_tile_kernel_equals_two_pass_and_shards_draw_the_whole_tensors_bits(tb, rand_bits):
    be, dev = tb
    n, cut = 16_384, 6_144
    inputs, idx, val = _inputs(n, 128, 8, seed_offset=8)
    one = _step(lambda *a, **kw: be.lion_step(*a, layout="3d", **kw), dev, inputs, idx, val, 128, "sr", 0,
                rand_bits=rand_bits)
    two = _step(lambda *a, **kw: be.lion_step(*a, layout="2pass", **kw), dev, inputs, idx, val, 128, "sr", 0,
                rand_bits=rand_bits)
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b), SEED
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    for lo, hi in ((0, cut), (cut, n)):
        be.lion_step(wc[lo:hi], ws[lo // 128:hi // 128], 128, mc[lo:hi], ms[lo // 256:hi // 256], 256, grad[lo:hi],
                     lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=SEED, step=3, offset=lo,
                     grad_scale=0.5, rand_bits=rand_bits)
    whole = _step(be.lion_step, dev, inputs, torch.zeros(0, dtype=torch.int32), val[:0], 128, "sr", 0,
                  rand_bits=rand_bits)
    for a, b in zip(whole[:4], (wc, ws, mc, ms)):
        assert torch.equal(a, b.cpu()), SEED


def test_rand_bits_are_checked(tb):
    be, dev = tb
    inputs, idx, val = _inputs(1024, 128, 8, seed_offset=9)
    for fn, d in ((be.lion_step, dev), (ref.lion_step, "cpu")):
        with pytest.raises(ValueError, match="rand_bits must be one of"):
            _step(fn, d, inputs, idx, val, 128, "sr", 0, rand_bits=12)
    with pytest.raises(ValueError, match="divisible by 16"):
        _step(lambda *a, **kw: be.lion_step(*a, layout="2pass", quad_rng=True, **kw), dev, inputs, idx, val, 128,
              "sr", 8, rand_bits=8)


# -- the bias, measured on the kernels' own stream --------------------------------------------------
@pytest.mark.parametrize("rand_bits", [16, 32, 8])
def test_weight_steps_are_unbiased_on_the_philox_stream(tb, rand_bits):
    """Every weight at code 10 takes a Lion step of lr = f * s (positive gradient, no decay): the mean
    move over 2^16 elements is round(2^15 f) / 2^15 of a step within 5 standard errors (round(256 f) / 256
    for rand_bits 8), for f = 0.3, 1.6 / 256 and 0.4 / 256; with 8 bits the last moves nothing (that
    option's cost), with 16 or 32 it moves at its own rate."""
    be, dev = tb
    n, wblock = 2**16, 128
    s = 1e-3
    grid = 256 if rand_bits == 8 else 2**15
    for f in (0.3, 1.6 / 256, 0.4 / 256):
        wc = torch.full((n,), 10, dtype=torch.int8)
        wc[::wblock] = 127  # each group's absmax: its scale stays s
        ws = torch.full((n // wblock,), s)
        mc, ms = torch.zeros(n, dtype=torch.int8), torch.zeros(n // 256)
        args = [t.to(dev) for t in (wc, ws, mc, ms)]
        be.lion_step(args[0], args[1], wblock, args[2], args[3], 256, torch.ones(n, device=dev), lr=f * s,
                     beta1=0.9, beta2=0.99, weight_decay=0.0, rounding="sr", seed=SEED, step=1, offset=0,
                     layout="3d", rand_bits=rand_bits)
        q = args[0].cpu().double().view(-1, wblock)[:, 1:]
        assert torch.equal(args[1].cpu(), ws), SEED
        move = 10 - q.mean().item()
        p = (10 - q).mean().item()
        se = max(p * (1 - p), 1e-12) ** 0.5 / q.numel() ** 0.5
        want = round(f * grid) / grid
        assert abs(move - want) <= 5 * se + 1e-12, (SEED, f, rand_bits, move, want, se)
        if want == 0:
            assert (q == 10).all()
        else:
            assert move > 0, (SEED, f, rand_bits)


@pytest.mark.parametrize("rand_bits", [16, 32, 8])
@pytest.mark.parametrize("high", [False, True])
def test_int4_momentum_codes_stay_within_7_unclamped_at_the_absmax(tb, rand_bits, high):
    """The int4 store packs codes without a clamp: at a block's absmax (and a hair below it, both signs),
    every value of the rounding's share gives |q| <= 7 (a wrap to 8 would flip the nibble's sign)."""
    _, dev = tb
    bits, share = _every_share(rand_bits, high)
    for amax in (0.0123, 3.7e-7, 1e-3 * (1 + 2**-23)):
        xs = torch.tensor([amax, -amax, amax * (1 - 2**-24), -amax * (1 - 2**-24)], dtype=torch.float32)
        n = len(xs) * share
        out = torch.empty(n, dtype=torch.int8, device=dev)
        _sr_probe[(n // 256,)](xs.repeat_interleave(share).to(dev),
                               bits.repeat(len(xs)).to(torch.uint32).view(torch.int32).to(dev),
                               torch.tensor([amax], device=dev), out, BLOCK=256, HIGH=high, RAND_BITS=rand_bits, M4=True)
        q = out.cpu().view(len(xs), share)
        assert q.abs().max() <= 7 and (q[0] >= 6).all() and (q[1] <= -6).all(), (amax, q.unique())
