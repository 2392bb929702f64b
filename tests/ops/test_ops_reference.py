"""The reference kernels: quantization error, unbiased stochastic rounding, counter-based RNG, Lion step."""
import pytest
import torch

from qft_ds.ops import get_ops, reference as ref


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("numel,block", [(4096, 256), (1000, 256), (777, 64)])
def test_quantize_dequantize_error_bound(numel, block):
    x = torch.randn(numel) * 0.02
    codes, scales = ref.quantize_blockwise(x, block, "rtn")
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert scales.numel() == -(-numel // block)
    y = ref.dequantize_blockwise(codes, scales, block)
    s = scales.repeat_interleave(block)[:numel]
    assert ((y - x).abs() <= 0.5 * s + 1e-12).all()  # round-to-nearest: half a step at most
    assert rel(y, x) < 0.01


def test_quantize_all_zero_block_stays_finite():
    x = torch.randn(512)
    x[:256] = 0
    codes, scales = ref.quantize_blockwise(x, 256)
    assert torch.isfinite(ref.dequantize_blockwise(codes, scales, 256)).all() and scales[0] == 0


def test_uniform_is_counter_based_and_shard_invariant():
    key = ref.rng_key(seed=3, step=7, stream=0)
    n = 3 * ref.RNG_CHUNK + 123
    full = ref.uniform(key, 1000, n, "cpu")
    assert torch.equal(full, ref.uniform(key, 1000, n, "cpu"))  # reproducible
    for lo, hi in [(0, 10), (5000, ref.RNG_CHUNK + 77), (ref.RNG_CHUNK - 1000, n)]:
        assert torch.equal(full[lo:hi], ref.uniform(key, 1000 + lo, hi - lo, "cpu"))  # a shard draws the same
    assert 0.0 <= full.min() and full.max() < 1.0
    assert abs(full.mean().item() - 0.5) < 0.01
    other = ref.uniform(ref.rng_key(seed=3, step=8, stream=0), 1000, n, "cpu")
    assert not torch.equal(full, other)


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(1024)
    scales = ref.absmax_scales(x, 256)
    draws = 3000
    acc = torch.zeros(1024, dtype=torch.float64)
    for step in range(draws):
        codes, _ = ref.quantize_blockwise(x, 256, "sr", ref.rng_key(0, step, 0), scales=scales)
        acc += ref.dequantize_blockwise(codes, scales, 256).double()
    mean = acc / draws
    s = scales.repeat_interleave(256).double()
    # each draw has std <= s/2; the mean of `draws` draws is within 6 sigma of x
    assert ((mean - x.double()).abs() <= 6 * 0.5 * s / draws**0.5).all()
    rtn, _ = ref.quantize_blockwise(x, 256, "rtn", scales=scales)
    bias_rtn = (ref.dequantize_blockwise(rtn, scales, 256) - x).abs().mean()
    assert (mean - x.double()).abs().mean() < 0.2 * bias_rtn  # SR's mean error is far below RTN's


def _state(numel=4096, wblock=128, mblock=256):
    w0 = torch.randn(numel) * 0.02
    wc, ws = ref.quantize_blockwise(w0, wblock)
    m0 = torch.randn(numel) * 1e-3
    mc, ms = ref.quantize_blockwise(m0, mblock)
    return wc, ws, mc, ms


@pytest.mark.parametrize("rounding", ["sr", "rtn", "ef"])
def test_int8_lion_step_matches_fp32_lion(rounding):
    wc, ws, mc, ms = _state()
    w = ref.dequantize_blockwise(wc, ws, 128)   # exactly representable start
    m = ref.dequantize_blockwise(mc, ms, 256)
    g = torch.randn(4096) * 1e-2
    lr, wd = 3e-4, 0.1
    w_ref, m_ref = w.clone(), m.clone()
    ref.lion_step_fp32(w_ref, m_ref, g, lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd)
    residual = torch.zeros_like(wc) if rounding == "ef" else None
    ref.lion_step(wc, ws, 128, mc, ms, 256, g, lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd,
                  rounding=rounding, seed=0, step=0, offset=0, residual=residual)
    w_new = ref.dequantize_blockwise(wc, ws, 128)
    m_new = ref.dequantize_blockwise(mc, ms, 256)
    s = ws.repeat_interleave(128)
    assert rel(m_new, m_ref) < 0.01  # int8 momentum: about 1/254 of the block max per element
    if rounding == "ef":  # int8 weight + int8 residual is a ~16-bit weight
        w_new = w_new + ref.dequantize_blockwise(residual, ws / 254.0, 128)
        assert ((w_new - w_ref).abs() <= s / 254 + 1e-9).all()
    else:
        assert ((w_new - w_ref).abs() <= s + 1e-9).all()  # one grid step at most
    if rounding == "sr":  # unbiased: the mean error is much smaller than the update
        assert abs((w_new - w_ref).mean().item()) < 0.1 * lr


def test_lion_step_updates_outliers_exactly():
    wc, ws, mc, ms = _state()
    idx = torch.tensor([3, 100, 4000], dtype=torch.int32)
    wc[idx.long()] = 0
    val = torch.tensor([0.5, -0.7, 0.9])
    m = ref.dequantize_blockwise(mc, ms, 256)
    g = torch.randn(4096)
    expect = val.clone()
    u = torch.sign(0.9 * m + 0.1 * g)[idx.long()]
    expect = expect * (1 - 2e-5 * 0.1) - 2e-5 * u
    ref.lion_step(wc, ws, 128, mc, ms, 256, g, lr=2e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr",
                  seed=0, step=0, offset=0, outlier_idx=idx, outlier_val=val)
    assert torch.allclose(val, expect, rtol=0, atol=1e-7)
    assert (wc[idx.long()] == 0).all()


def test_triton_backend_request_fails_loudly_without_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU machine without the interpreter
    with pytest.raises(ValueError, match="qft.backend='triton' was requested but cannot run on cpu"):
        get_ops("triton", "cpu")  # a config error: train.py reports it in one line when it reads the config
    assert get_ops("auto", "cpu").backend == "torch"
    with pytest.raises(ValueError, match="qft.backend"):
        get_ops("cuda-magic", "cpu")


@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_foreach_fp32_lion_writes_the_per_tensor_bits(grad_scale):
    """The optimizer updates all float params of a group with one foreach call: the same bits as the
    per-tensor reference, for tensors of several shapes."""
    g = torch.Generator().manual_seed(4)
    shapes = [(64,), (3, 5), (1,), (7, 2, 3)]
    params = [torch.randn(s, generator=g) for s in shapes]
    moms = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-1 for s in shapes]
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_scale=grad_scale)
    p1, m1 = [p.clone() for p in params], [m.clone() for m in moms]
    for p, m, gr in zip(p1, m1, grads):
        ref.lion_step_fp32(p, m, gr, **kw)
    ref.lion_step_fp32_foreach(params, moms, grads, **kw)
    for a, b in zip(p1 + m1, params + moms):
        assert torch.equal(a, b)
    assert not torch.equal(p1[0], torch.randn(64, generator=torch.Generator().manual_seed(4)))  # it moved
