"""The reference ops on CUDA: same maths as on the CPU (RTN bit for bit, SR in distribution)."""
import pytest
import torch

from qft_ds.ops import reference as ref

pytestmark = pytest.mark.gpu


def test_quantize_rtn_matches_cpu():
    x = torch.randn(100_003) * 0.02
    c_cpu, s_cpu = ref.quantize_blockwise(x, 256)
    c_gpu, s_gpu = ref.quantize_blockwise(x.cuda(), 256)
    assert torch.allclose(s_cpu, s_gpu.cpu(), rtol=1e-6, atol=0)
    diff = (c_cpu.int() - c_gpu.cpu().int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 1e-3  # x * (1/s) may differ by an ulp at ties


def test_uniform_on_cuda_is_reproducible_shard_invariant_and_uniform():
    key = ref.rng_key(1, 2, 0)
    n = 5 * ref.RNG_CHUNK + 17
    u = ref.uniform(key, 12345, n, "cuda")
    assert torch.equal(u, ref.uniform(key, 12345, n, "cuda"))
    assert torch.equal(u[70_000:], ref.uniform(key, 12345 + 70_000, n - 70_000, "cuda"))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


def test_lion_step_cuda_matches_cpu_in_distribution():
    torch.manual_seed(0)
    n = 1 << 18
    wc, ws = ref.quantize_blockwise(torch.randn(n) * 0.02, 128)
    mc, ms = ref.quantize_blockwise(torch.randn(n) * 1e-3, 256)
    g = torch.randn(n) * 1e-2
    out = {}
    for dev in ("cpu", "cuda"):
        t = [a.clone().to(dev) for a in (wc, ws, mc, ms)]
        ref.lion_step(t[0], t[1], 128, t[2], t[3], 256, g.to(dev), lr=1e-4, beta1=0.9, beta2=0.99,
                      weight_decay=0.1, rounding="sr", seed=0, step=0, offset=0)
        out[dev] = [a.cpu() for a in t]
    w_cpu = ref.dequantize_blockwise(out["cpu"][0], out["cpu"][1], 128)
    w_gpu = ref.dequantize_blockwise(out["cuda"][0], out["cuda"][1], 128)
    w0 = ref.dequantize_blockwise(wc, ws, 128)
    d_cpu, d_gpu = (w_cpu - w0), (w_gpu - w0)
    # different generators, same distribution: the mean update agrees within sampling noise
    assert abs(d_cpu.mean() - d_gpu.mean()) < 5 * d_cpu.std() / n**0.5
    assert abs((d_cpu != 0).float().mean() - (d_gpu != 0).float().mean()) < 0.01
