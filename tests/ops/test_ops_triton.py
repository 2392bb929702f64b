"""Triton kernels against their PyTorch reference twins.

On CPU they run under TRITON_INTERPRET=1 at small sizes; with CUDA the same checks run compiled."""
import pytest
import torch

from qft_ds.ops import reference as ref

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from qft_ds.ops import triton_kernels as tk  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("n,block", [(10_000, 96), (8192, 256)])
def test_dequantize_matches_reference(tb, n, block):
    be, dev = tb
    codes, scales = ref.quantize_blockwise(torch.randn(n), block)
    codes, scales = codes.to(dev), scales.to(dev)
    out = be.dequantize_blockwise_kernel(codes, scales, block, torch.float32)
    assert torch.equal(out.cpu(), ref.dequantize_blockwise(codes.cpu(), scales.cpu(), block))
    out16 = be.dequantize_blockwise_kernel(codes, scales, block, torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and rel(out16.cpu(), out.cpu()) < 4e-3


@pytest.mark.parametrize("block,dtype", [(96, torch.bfloat16), (128, torch.float32)])
def test_dequantize_hybrid_matches_reference(tb, block, dtype):
    """Dense dequantize + outliers in one launch; outliers in several chunks, at chunk edges, and a chunk
    without any (the last one)."""
    be, dev = tb
    n = 3 * be.DEQUANT_CHUNK + 500
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g) * 0.02
    idx = torch.randperm(2 * be.DEQUANT_CHUNK, generator=g)[:300]
    idx = torch.cat([idx, torch.tensor([0, be.DEQUANT_CHUNK - 1, be.DEQUANT_CHUNK, 2 * be.DEQUANT_CHUNK - 1])])
    idx = idx.unique().sort().values.to(torch.int32)
    val = torch.randn(idx.numel(), generator=g)
    x[idx.long()] = 0.0  # the hybrid invariant: an outlier's dense code is 0
    codes, scales = ref.quantize_blockwise(x, block)
    want = ref.dequantize_hybrid(codes, scales, block, idx, val, dtype)
    args = [t.to(dev) for t in (codes, scales)]
    got = be.dequantize_hybrid(*args, block, idx.to(dev), val.to(dev), dtype)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got.cpu(), want)
    else:  # the interpreter's fp32 -> bf16 cast truncates where CUDA rounds to nearest: one bf16 ulp
        assert torch.allclose(got.cpu().float(), want.float(), rtol=2**-7, atol=0)
    assert torch.allclose(got.cpu()[idx.long()].float(), val, rtol=2**-7, atol=0)  # outliers, not dense 0s


def test_outlier_chunk_ptrs_follow_in_place_changes(tb):
    """The cached per-chunk outlier ranges are recomputed when the indices change in place (a load)."""
    be, dev = tb
    idx = torch.tensor([1, 5, 9000, 20000], dtype=torch.int32, device=dev)
    first = be.outlier_chunk_ptrs(idx, 8192, 3)
    assert first.tolist() == [0, 2, 3, 4]
    assert be.outlier_chunk_ptrs(idx, 8192, 3) is first  # cached: no launch
    idx.copy_(torch.tensor([1, 8200, 8300, 9000], dtype=torch.int32))
    assert be.outlier_chunk_ptrs(idx, 8192, 3).tolist() == [0, 1, 4, 4]


@pytest.mark.parametrize("n,block", [(5000, 256), (3000, 96)])
def test_quantize_rtn_matches_reference(tb, n, block):
    be, dev = tb
    x = torch.randn(n) * 0.03
    c, s = be.quantize_blockwise(x.to(dev), block, "rtn")
    rc, rs = ref.quantize_blockwise(x, block, "rtn")
    assert torch.allclose(s.cpu(), rs, rtol=1e-6, atol=0)
    diff = (c.cpu().int() - rc.int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 1e-3  # ties only


def test_quantize_sr_is_unbiased_and_reproducible(tb):
    be, dev = tb
    x = torch.randn(2048).to(dev)
    scales = ref.absmax_scales(x.cpu(), 256)
    draws = 200
    acc = torch.zeros(2048, dtype=torch.float64)
    for step in range(draws):
        c, s = be.quantize_blockwise(x, 256, "sr", ref.rng_key(0, step, 0))
        acc += ref.dequantize_blockwise(c.cpu(), s.cpu(), 256).double()
    err = acc / draws - x.cpu().double()
    sd = scales.repeat_interleave(256).double() * 0.5 / draws**0.5
    assert (err.abs() <= 6 * sd).all()
    a = be.quantize_blockwise(x, 256, "sr", ref.rng_key(0, 7, 0))[0]
    assert torch.equal(a, be.quantize_blockwise(x, 256, "sr", ref.rng_key(0, 7, 0))[0])


# Small kernels that run the Lion kernels' helpers alone (compiled on CUDA, else interpreted: conftest sets
# TRITON_INTERPRET=1 before this module is imported, and @triton.jit reads it when it decorates).
@triton.jit
def _philox_probe(out_ptr, key, base, N: tl.constexpr, ROUNDS: tl.constexpr):
    i = tl.arange(0, N)
    ctr = base + i.to(tl.int64)
    a0, a1, a2, a3 = tk._philox(key, ctr, ROUNDS)
    b0, b1, b2, b3 = tl.randint4x(key, ctr, ROUNDS)
    tl.store(out_ptr + i, ((a0 == b0) & (a1 == b1) & (a2 == b2) & (a3 == b3)).to(tl.int8))


@pytest.mark.parametrize("rounds", [10, 7, 1])
def test_philox_draws_the_bits_of_tl_randint4x(tb, rounds):
    """The kernels' Philox (wide multiplies compiled, the first round folded) is tl.randint4x bit for bit,
    counters across a 2^32 boundary (their high word) included."""
    _, dev = tb
    out = torch.zeros(1024, dtype=torch.int8, device=dev)
    for key, base in ((ref.rng_key(0, 3, 0), 2**32 - 512), (12345, 0)):
        _philox_probe[(1,)](out, key, base, N=1024, ROUNDS=rounds)
        assert out.all()


def test_lion_kernel_folded_scalars_edge_cases(tb):
    """The kernels fold (1 - b1) * grad_scale into one scalar mix = b1 / ((1 - b1) * gs) (sign only): with
    grad_scale 0 it is inf and the step follows sign(m) alone, as the reference's; a negative grad_scale
    would flip the sign and is refused."""
    be, dev = tb
    inputs = _lion_inputs(8192, 128, seed=11)
    inputs[2][:256] = 0  # a zero momentum block: sign 0, no step
    outs = []
    for fn, d in ((be.lion_step, dev), (ref.lion_step, "cpu")):
        wc, ws, mc, ms, grad = (t.clone().to(d) for t in inputs)
        fn(wc, ws, 128, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="rtn",
           seed=0, step=3, offset=0, grad_scale=0.0)
        outs.append((wc.cpu(), ws.cpu()))
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-6)
    assert ((outs[0][0].int() - outs[1][0].int()).abs() > 0).float().mean() < 1e-3  # ties only
    assert be._lion_scalars(1.0, 0.99, 1.0)[0] == float("inf")  # b1 = 1: sign(m) alone too
    with pytest.raises(ValueError, match="grad_scale"):
        be.lion_step(*(t.clone().to(dev) for t in inputs[:2]), 128, *(t.clone().to(dev) for t in inputs[2:4]),
                     256, inputs[4].to(dev), lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr",
                     seed=0, step=3, offset=0, grad_scale=-1.0)


def _lion_inputs(n, wblock, seed=0):
    g = torch.Generator().manual_seed(seed)
    wc, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, wblock)
    mc, ms = ref.quantize_blockwise(torch.randn(n, generator=g) * 1e-3, 256)
    grad = torch.randn(n, generator=g) * 1e-2
    return wc, ws, mc, ms, grad


def _run(fn, dev, inputs, wblock, rounding, lr=3e-4, idx=None, val=None):
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    res = torch.zeros_like(wc) if rounding == "ef" else None
    fn(wc, ws, wblock, mc, ms, 256, grad, lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding=rounding,
       seed=0, step=3, offset=1000, outlier_idx=None if idx is None else idx.to(dev),
       outlier_val=None if val is None else val, residual=res, grad_scale=0.5)
    return [t.cpu() if t is not None else None for t in (wc, ws, mc, ms, res)]


@pytest.mark.parametrize("n,wblock", [(12_000, 96), (8192, 128)])
def test_lion_kernel_rtn_matches_reference(tb, n, wblock):
    be, dev = tb
    inputs = _lion_inputs(n, wblock)
    k = _run(be.lion_step, dev, inputs, wblock, "rtn", lr=1e-3)
    r = _run(ref.lion_step, "cpu", inputs, wblock, "rtn", lr=1e-3)
    assert torch.allclose(k[1], r[1], rtol=1e-6)                      # weight scales
    assert ((k[0].int() - r[0].int()).abs() > 0).float().mean() < 1e-3  # weight codes: ties only
    # momentum is stochastically rounded by another generator: bound both against exact fp32
    m0 = ref.dequantize_blockwise(inputs[2], inputs[3], 256)
    m_exact = 0.99 * m0 + 0.01 * 0.5 * inputs[4]
    err_k = rel(ref.dequantize_blockwise(k[2], k[3], 256), m_exact)
    err_r = rel(ref.dequantize_blockwise(r[2], r[3], 256), m_exact)
    assert err_k < 0.02 and err_r < 0.02 and 0.5 < err_k / err_r < 2


@pytest.mark.parametrize("rounding", ["sr", "ef"])
def test_lion_kernel_sr_and_ef_against_fp32_lion(tb, rounding):
    be, dev = tb
    n, wblock = 12_288, 96
    inputs = _lion_inputs(n, wblock, seed=1)
    wc, ws, mc, ms, grad = inputs
    w_ref = ref.dequantize_blockwise(wc, ws, wblock)
    m_ref = ref.dequantize_blockwise(mc, ms, 256)
    ref.lion_step_fp32(w_ref, m_ref, grad, lr=3e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_scale=0.5)
    k = _run(be.lion_step, dev, inputs, wblock, rounding)
    w = ref.dequantize_blockwise(k[0], k[1], wblock)
    s = k[1].repeat_interleave(wblock)
    if rounding == "ef":
        w = w + ref.dequantize_blockwise(k[4], k[1] / 254.0, wblock)
        assert ((w - w_ref).abs() <= s / 254 + 1e-9).all()
    else:
        assert ((w - w_ref).abs() <= s + 1e-9).all()
        assert abs((w - w_ref).mean().item()) < 0.1 * 3e-4  # unbiased
    assert rel(ref.dequantize_blockwise(k[2], k[3], 256), m_ref) < 0.02


def test_lion_kernel_outliers_exact(tb):
    be, dev = tb
    inputs = _lion_inputs(4096, 128, seed=2)
    idx = torch.tensor([5, 700, 4095], dtype=torch.int32)
    inputs[0][idx.long()] = 0
    vk = torch.tensor([0.5, -0.7, 0.9]).to(dev)
    vr = vk.cpu().clone()
    k = _run(be.lion_step, dev, inputs, 128, "sr", idx=idx, val=vk)
    _run(ref.lion_step, "cpu", inputs, 128, "sr", idx=idx, val=vr)
    assert torch.allclose(vk.cpu(), vr, atol=1e-7, rtol=0)
    assert (k[0][idx.long()] == 0).all()


@pytest.mark.parametrize("rounding", ["sr", "ef"])
def test_lion_kernel_quad_rng_equals_elementwise_rng(tb, rounding):
    """One Philox call per 4 elements (the fast path) must draw exactly the element-wise numbers."""
    be, dev = tb
    inputs = _lion_inputs(12_288, 96, seed=3)
    fast = _run(lambda *a, **k: be.lion_step(*a, quad_rng=True, **k), dev, inputs, 96, rounding)
    slow = _run(lambda *a, **k: be.lion_step(*a, quad_rng=False, **k), dev, inputs, 96, rounding)
    for a, b in zip(fast, slow):
        assert a is None and b is None or torch.equal(a, b)


def test_lion_kernel_shards_draw_what_the_whole_tensor_draws(tb):
    """A shard updated at its global offset gets the bits the whole tensor gets (ZeRO relies on it)."""
    be, dev = tb
    n, wblock, cut = 16_384, 128, 6_144  # the cut: a multiple of lcm(128, 256), not of the kernel chunk
    inputs = _lion_inputs(n, wblock, seed=4)
    whole = _run(be.lion_step, dev, inputs, wblock, "sr")
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    for lo, hi in ((0, cut), (cut, n)):
        be.lion_step(wc[lo:hi], ws[lo // wblock:hi // wblock], wblock, mc[lo:hi], ms[lo // 256:hi // 256], 256,
                     grad[lo:hi], lr=3e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0,
                     step=3, offset=1000 + lo, grad_scale=0.5)
    for a, b in zip(whole[:4], (wc, ws, mc, ms)):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("wblock", [96, 128])  # two-pass and one-pass kernel layouts
def test_lion_kernel_not_finite_writes_nothing_and_bf16_grad_reads_like_fp32(tb, wblock):
    be, dev = tb
    inputs = _lion_inputs(8192 * 3 // 2, wblock, seed=5)
    idx = torch.tensor([7, 4000], dtype=torch.int32)
    inputs[0][idx.long()] = 0
    val = torch.tensor([0.5, -0.3]).to(dev)
    # a False flag, or a float flag (training passes the gradient's norm) that is NaN or inf
    for flag in (torch.tensor(False), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        skip = _run(lambda *a, **k: be.lion_step(*a, finite=flag.to(dev), **k), dev, inputs, wblock, "sr",
                    idx=idx, val=val)
        for a, b in zip(skip[:4], inputs[:4]):
            assert torch.equal(a, b)
        assert torch.equal(val.cpu(), torch.tensor([0.5, -0.3]))
    run = _run(lambda *a, **k: be.lion_step(*a, finite=torch.tensor(3.5, device=dev), **k), dev, inputs, wblock,
               "sr", idx=idx, val=val)
    assert not torch.equal(run[2], inputs[2])  # a finite norm: written
    g16 = inputs[4].bfloat16()
    as16 = _run(be.lion_step, dev, (*inputs[:4], g16), wblock, "sr")
    as32 = _run(be.lion_step, dev, (*inputs[:4], g16.float()), wblock, "sr")
    for a, b in zip(as16[:4], as32[:4]):
        assert torch.equal(a, b)


def _same_outliers(a, b, dev):
    """fp32 outlier values from the kernel against torch's ops: bit-equal interpreted; compiled, the kernel's
    `v * decay - lr * u` contracts to one FMA where torch rounds twice, so they may differ by an ulp."""
    if dev == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=2.5e-7, atol=0) and not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("rounding", ["sr", "ef", "rtn"])
def test_lion_kernel_3d_layout_equals_two_pass(tb, rounding):
    """One [blocks, groups, group] tile (group divides block) writes what the two-pass kernel writes,
    outliers and a ragged last block included."""
    be, dev = tb
    n = 8192 + 384  # a partial last momentum block
    inputs = _lion_inputs(n, 128, seed=6)
    idx = torch.tensor([3, 5000, n - 1], dtype=torch.int32)
    inputs[0][idx.long()] = 0
    outs = []
    for layout in ("2pass", "3d"):
        val = torch.tensor([0.4, -0.2, 0.1]).to(dev)
        out = _run(lambda *a, **k: be.lion_step(*a, layout=layout, **k), dev, inputs, 128, rounding, idx=idx, val=val)
        outs.append((out, val.cpu()))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert a is None and b is None or torch.equal(a, b)
    assert _same_outliers(outs[0][1], outs[1][1], dev)
    with pytest.raises(ValueError, match="layout '3d'"):
        _run(lambda *a, **k: be.lion_step(*a, layout="3d", **k), dev, _lion_inputs(960, 96), 96, rounding)


@pytest.mark.parametrize("rounding", ["sr", "ef"])
def test_lion_kernel_fused_outliers_equal_the_torch_outlier_path(tb, rounding):
    """Outliers updated inside the 3d kernel (one launch) write what the torch ops around it write."""
    be, dev = tb
    n = 4096 + 256
    inputs = _lion_inputs(n, 128, seed=7)
    idx = torch.tensor([0, 1, 2, 700, 2047, 2048, 4000, n - 1], dtype=torch.int32)  # several in one chunk
    inputs[0][idx.long()] = 0
    outs = []
    for fused in (False, True):
        val = torch.linspace(-0.5, 0.5, len(idx)).to(dev)
        out = _run(lambda *a, **k: be.lion_step(*a, layout="3d", fused_outliers=fused, chunk=1024, **k), dev,
                   inputs, 128, rounding, idx=idx, val=val)
        outs.append((out, val.cpu()))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert a is None and b is None or torch.equal(a, b)
    assert _same_outliers(outs[0][1], outs[1][1], dev) and (outs[1][0][0][idx.long()] == 0).all()
    skip_val = torch.linspace(-0.5, 0.5, len(idx)).to(dev)
    _run(lambda *a, **k: be.lion_step(*a, layout="3d", fused_outliers=True, chunk=1024,
                                      finite=torch.tensor(False, device=dev), **k), dev, inputs, 128, rounding,
         idx=idx, val=skip_val)
    assert torch.equal(skip_val.cpu(), torch.linspace(-0.5, 0.5, len(idx)))  # not finite: nothing written


def test_lion_layout_from_environment(tb, monkeypatch):
    """QFT_DS_LION_LAYOUT=auto: the one-tile kernel where the shape allows, two-pass elsewhere, same bits."""
    be, dev = tb
    for wblock in (128, 96):
        inputs = _lion_inputs(4096 * 3 // 2 if wblock == 96 else 4096, wblock, seed=8)
        monkeypatch.setenv("QFT_DS_LION_LAYOUT", "auto")
        auto = _run(be.lion_step, dev, inputs, wblock, "sr")
        monkeypatch.setenv("QFT_DS_LION_LAYOUT", "2pass")
        two = _run(be.lion_step, dev, inputs, wblock, "sr")
        for a, b in zip(auto[:4], two[:4]):
            assert torch.equal(a, b)
    monkeypatch.setenv("QFT_DS_LION_LAYOUT", "fast")
    with pytest.raises(ValueError, match="QFT_DS_LION_LAYOUT"):
        _run(be.lion_step, dev, _lion_inputs(4096, 128), 128, "sr")


def test_lion_layout_default_is_the_one_tile_kernel_where_it_fits(tb, monkeypatch):
    """No QFT_DS_LION_LAYOUT: group 128 (divides the 256 block) takes lion_kernel_3d, group 96 two-pass."""
    be, dev = tb
    monkeypatch.delenv("QFT_DS_LION_LAYOUT", raising=False)
    launched = []
    real = be._launch_3d
    monkeypatch.setattr(be, "_launch_3d", lambda *a, **k: launched.append(a[2]) or real(*a, **k))
    for wblock in (128, 96):
        _run(be.lion_step, dev, _lion_inputs(4096 * 3 // 2 if wblock == 96 else 4096, wblock, seed=9), wblock, "sr")
    assert launched == [128]


@pytest.mark.parametrize("layout,fused", [("2pass", False), ("3d", False), ("3d", True)])
def test_lion_kernel_clip_budget_on_device_equals_the_host_scale(tb, layout, fused):
    """A clipping budget with the gradient's norm on the device (the fused flow's per-tensor clip) writes
    what the host-side grad_scale min(1, budget / norm) writes, outliers included; and what the reference
    writes from the same budget."""
    be, dev = tb
    n = 4096 + 256
    inputs = _lion_inputs(n, 128, seed=8)
    idx = torch.tensor([0, 700, 2048, n - 1], dtype=torch.int32)
    inputs[0][idx.long()] = 0
    grad = inputs[4]
    norm = grad.norm().reshape(())
    budget = 0.3 * norm.item()  # clipping active: scale ~0.3
    outs = []
    for how in ("device", "host", "reference"):
        val = torch.linspace(-0.5, 0.5, len(idx)).to(dev)
        if how == "reference":
            fn, d = (lambda *a, **k: ref.lion_step(*a, **k)), "cpu"
            val = val.cpu()
        else:
            fn, d = (lambda *a, **k: be.lion_step(*a, layout=layout, fused_outliers=fused, **k)), dev
        scale = {"grad_scale": 1.0}
        if how == "host":
            scale = {"grad_scale": ref.clip_scale(1.0, budget, norm.item())}
        else:
            scale.update(clip=budget, finite=norm.to(d))
        wc, ws, mc, ms, g = (t.clone().to(d) for t in inputs)
        fn(wc, ws, 128, mc, ms, 256, g, lr=3e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr",
           seed=0, step=3, offset=1000, outlier_idx=idx.to(d), outlier_val=val, **scale)
        outs.append([t.cpu() for t in (wc, ws, mc, ms, val)])
    dev_out, host_out, ref_out = outs
    # fp32 on the device vs fp64 on the host: scales within an ulp or two, codes differ by a rare rounding flip
    for a, b in zip(dev_out, host_out):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-5, atol=0)
        else:
            assert (a != b).float().mean() < 2e-3
    m_exact = 0.99 * ref.dequantize_blockwise(inputs[2], inputs[3], 256) + 0.01 * 0.3 * grad
    assert rel(ref.dequantize_blockwise(dev_out[2], dev_out[3], 256), m_exact) < 0.02
    assert rel(ref.dequantize_blockwise(ref_out[2], ref_out[3], 256), m_exact) < 0.02
    assert torch.allclose(dev_out[4], ref_out[4], atol=1e-7)  # outliers: exact fp32 in both
    with pytest.raises(ValueError, match="norm"):
        be.lion_step(*[t.clone().to(dev) for t in inputs[:2]], 128, *[t.clone().to(dev) for t in inputs[2:4]], 256,
                     grad.to(dev), lr=3e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0, step=3,
                     offset=0, clip=1.0, finite=torch.tensor(True, device=dev))


@pytest.mark.parametrize("layout", ["2pass", "3d"])
def test_error_feedback_moves_by_lr_on_average_where_an_update_is_a_fraction_of_its_carry_step(tb, layout):
    """lr = 0.2 of the carry's step s/254: a carry rounded to nearest never moved (the update was lost
    every step); stochastically rounded, weight + carry moves by -lr on average, in kernel and reference."""
    be, dev = tb
    n, wblock = 8192, 128
    g = torch.Generator().manual_seed(11)
    wc, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, wblock)
    lr = 0.2 * ws.min().item() / 254
    moves = {}
    for name, fn, d in (("kernel", lambda *a, **k: be.lion_step(*a, layout=layout, **k), dev),
                        ("reference", ref.lion_step, "cpu")):
        w_codes, w_scales = wc.clone().to(d), ws.clone().to(d)
        m_codes, m_scales = torch.zeros(n, dtype=torch.int8, device=d), torch.zeros(n // 256, device=d)
        res = torch.zeros(n, dtype=torch.int8, device=d)
        before = ref.dequantize_blockwise(wc, ws, wblock)
        for step in range(5):  # a positive gradient: every element steps by -lr
            fn(w_codes, w_scales, wblock, m_codes, m_scales, 256, torch.ones(n, device=d), lr=lr, beta1=0.9,
               beta2=0.99, weight_decay=0.0, rounding="ef", seed=0, step=step, offset=0, residual=res)
        s = w_scales.cpu()
        after = ref.dequantize_blockwise(w_codes.cpu(), s, wblock) + ref.dequantize_blockwise(res.cpu(), s / 254, wblock)
        moves[name] = (after - before).mean().item() / (5 * lr)
    assert moves["kernel"] == pytest.approx(-1.0, abs=0.05)
    assert moves["reference"] == pytest.approx(-1.0, abs=0.05)
