"""The int4-momentum Lion kernel with its packed momentum loaded and stored as whole byte tiles (m4_vec,
constexpr M4_VEC of lion_kernel_3d) against today's int4 kernel: the same bits, every output, on fresh
random inputs; against the PyTorch reference on the same Philox bits; and the machine code it was built
for (one wide load and store of the packed momentum per thread, no shared-memory round trip).

Inputs are fresh random draws (the seed is in every message). Kernels run interpreted on the CPU, compiled
with CUDA; the SASS check compiles for sm_90 on any machine."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qft_ds.ops import reference as ref

SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh per run; printed on failure


def _inputs(n, seed_offset):
    g = torch.Generator().manual_seed(SEED + seed_offset)
    wc, ws = ref.quantize_blockwise(torch.randn(n, generator=g) * 0.02, 128)
    m0 = torch.randn(n, generator=g) * 1e-3
    m0[-1] = 5e-3  # the tail block's absmax: code 7, so a lost last byte (half pad when n is odd) shows
    mc, ms = ref.quantize_momentum(m0, 256, ref.rng_key(SEED, 0, 1), 0, bits=4)
    idx = torch.randperm(n, generator=g)[: n // 100].sort().values.to(torch.int32)  # 1% outliers
    idx = torch.unique(torch.cat([idx, torch.tensor([0, n - 1], dtype=torch.int32)]))  # both ends, the tail
    wc[idx.long()] = 0  # the hybrid invariant: an outlier's dense code is 0
    val = torch.randn(idx.numel(), generator=g) * 0.05
    grad = torch.randn(n, generator=g) * 1e-2
    grad[-1] = -2.0  # and its new code -7: a last byte left unwritten shows too
    return [wc, ws, mc, ms, grad], idx, val


def _step(fn, dev, inputs, idx, val, rounding="sr", offset=2048, finite=None, **kw):
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    res = torch.zeros_like(wc) if rounding == "ef" else None
    v = val.clone().to(dev)
    fn(wc, ws, 128, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding=rounding,
       seed=SEED, step=3, offset=offset, outlier_idx=idx.to(dev), outlier_val=v, residual=res, grad_scale=0.5,
       momentum_bits=4, finite=None if finite is None else finite.to(dev), **kw)
    return [t.cpu() if t is not None else None for t in (wc, ws, mc, ms, res, v)]


def _kernel(be, m4_vec, chunk=2048):
    return lambda *a, **kw: be.lion_step(*a, layout="3d", fused_outliers=True, chunk=chunk, m4_vec=m4_vec, **kw)


@pytest.mark.parametrize("rand_bits", [32, 16, 8])
@pytest.mark.parametrize("rounding", ["sr", "ef", "rtn"])
@pytest.mark.parametrize("n_tail", [0, 3 * 128 + 1, 16])
def test_m4_vec_writes_todays_int4_kernels_bits(tb, rand_bits, rounding, n_tail):
    """Weight codes and scales, packed momentum bytes and scales, EF carry and outliers: torch.equal with
    today's kernel; whole tiles, a partial odd-length tail (the last byte half pad) and a 16-element tail."""
    be, dev = tb
    n = 2 * 4096 + n_tail
    inputs, idx, val = _inputs(n, seed_offset=rand_bits + n_tail)
    old = _step(_kernel(be, False), dev, inputs, idx, val, rounding, rand_bits=rand_bits)
    new = _step(_kernel(be, True), dev, inputs, idx, val, rounding, rand_bits=rand_bits)
    for name, a, b in zip(("w", "ws", "m", "ms", "carry", "outliers"), old, new):
        assert (a is None and b is None) or torch.equal(a, b), (SEED, name)
    assert (new[2] != inputs[2]).float().mean() > 0.05, SEED  # SR moves codes (g2 * g ~ 1/10 of a step): rewritten
    if n % 2:
        assert new[2][-1] >> 4 == 0, SEED  # the pad nibble stays 0


@pytest.mark.parametrize("chunk", [256, 4096])
def test_m4_vec_at_other_tile_sizes_and_shards(tb, chunk):
    """One momentum block per program and 16 per program: the same bits as today's kernel; a shard cut
    at a block boundary, updated at its global offset, writes the whole tensor's bytes."""
    be, dev = tb
    n, cut = 16_384 + 256, 6_144
    inputs, idx, val = _inputs(n, seed_offset=chunk)
    old = _step(_kernel(be, False, chunk), dev, inputs, idx, val)
    new = _step(_kernel(be, True, chunk), dev, inputs, idx, val)
    for a, b in zip(old, new):
        assert (a is None and b is None) or torch.equal(a, b), SEED
    empty = torch.zeros(0, dtype=torch.int32)
    whole = _step(_kernel(be, True, chunk), dev, inputs, empty, val[:0])
    wc, ws, mc, ms, grad = (t.clone().to(dev) for t in inputs)
    for lo, hi in ((0, cut), (cut, n)):
        be.lion_step(wc[lo:hi], ws[lo // 128:hi // 128], 128, mc[lo // 2:hi // 2], ms[lo // 256:hi // 256], 256,
                     grad[lo:hi], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=SEED, step=3,
                     offset=2048 + lo, grad_scale=0.5, momentum_bits=4, layout="3d", chunk=chunk, m4_vec=True)
    for a, b in zip(whole[:4], (wc, ws, mc, ms)):
        assert torch.equal(a, b.cpu()), SEED


@pytest.mark.parametrize("rand_bits", [32, 8])
def test_m4_vec_matches_the_reference_on_the_same_bits(tb, rand_bits):
    """As test_lion_rand_bits's kernel-vs-reference check: equal codes but for rare one-code flips where the
    kernel's FMAs round differently from torch's two roundings; scales within an ulp; outliers fp32."""
    be, dev = tb
    n = 8192 + 3 * 128 + 1
    inputs, idx, val = _inputs(n, seed_offset=100 + rand_bits)
    k = _step(_kernel(be, True), dev, inputs, idx, val, rand_bits=rand_bits)
    r = _step(ref.lion_step, "cpu", inputs, idx, val, rand_bits=rand_bits)
    assert torch.allclose(k[1], r[1], rtol=1e-6, atol=0) and torch.allclose(k[3], r[3], rtol=1e-6, atol=0), SEED
    assert torch.allclose(k[5], r[5], rtol=2.5e-7, atol=1e-9), SEED
    for a, b in ((k[0], r[0]), (ref.momentum_codes(k[2], n, 4), ref.momentum_codes(r[2], n, 4))):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff != 0).float().mean() < 1e-3, (SEED, (diff != 0).sum())


def test_m4_vec_writes_nothing_for_a_non_finite_norm_and_checks_its_inputs(tb):
    be, dev = tb
    n = 4096 + 256
    inputs, idx, val = _inputs(n, seed_offset=7)
    for flag in (torch.tensor(float("nan")), torch.tensor(False)):
        skip = _step(_kernel(be, True), dev, inputs, idx, val, finite=flag)
        for a, b in zip(skip[:4], inputs[:4]):
            assert torch.equal(a, b), SEED
        assert torch.equal(skip[5], val)
    with pytest.raises(ValueError, match="m4_vec needs momentum_bits=4 and layout='3d'"):
        _step(lambda *a, **kw: be.lion_step(*a, layout="2pass", m4_vec=True, **kw), dev, inputs, idx, val)
    wc, ws, mc, ms, grad = (t.to(dev) for t in inputs)
    with pytest.raises(ValueError, match="m_codes holds 2175 bytes, 4352 int4 codes need 2176"):
        be.lion_step(wc, ws, 128, mc[:-1], ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                     rounding="sr", seed=0, step=0, offset=0, momentum_bits=4, layout="3d", m4_vec=True)


def test_m4_vec_loads_and_stores_the_packed_momentum_wide():
    """Compiled for sm_90 as lion_bandwidth's BITS_SWEEP launches it (16 elements per thread): today's int4
    kernel moves its packed momentum in single bytes and through shared memory; M4_VEC in one 8-byte load
    and one 8-byte store per thread (as int8 uses one 16-byte access each), no narrow shared-memory stores,
    fewer instructions."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[2] / "bench" / "kernel_sass.py"
    proc = subprocess.run([sys.executable, str(script), "--m4-vec-sweep", "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip(f"this triton install cannot run ptxas: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    rows = {(r["m4_vec"], r["rand_bits"], r["chunk"]): r for r in json.loads(proc.stdout.splitlines()[-1])}
    old, new = rows[(False, 16, 2048)], rows[(True, 16, 2048)]
    def narrow_shared_stores(row):  # the pairs' bytes: STS.U8 with one triton (3.9), STS.U16 with another (3.6)
        return row["memory"].get("STS.U8", 0) + row["memory"].get("STS.U16", 0)
    assert narrow_shared_stores(old) > 0 and narrow_shared_stores(new) == 0
    assert new["memory"].get("LDG.E.64", 0) == 1 and new["memory"].get("STG.E.64", 0) == 1
    assert old["memory"].get("LDG.E.64", 0) == 0 and old["memory"].get("STG.E.64", 0) == 0
    # the U8 accesses left are the outlier loops' (the gather of an outlier's byte, the zeroing stores)
    assert new["memory"]["LDG.E.U8"] < old["memory"]["LDG.E.U8"]
    assert new["memory"]["STG.E.U8"] < old["memory"]["STG.E.U8"]
    assert new["instructions"] < old["instructions"]


def test_m4_vec_is_the_default_and_the_env_switch(tb, monkeypatch):
    """m4_vec left None takes the byte tiles, keep_outliers left None keeps the outliers (both the same bits:
    the tests above); QFT_DS_LION_M4_VEC=0 (bench/memory_speed.py's qft_m4_bytewise_chunked) gives the
    byte-wise kernel's bits, which are the same again; a value other than 0 or 1 is an error naming it."""
    be, dev = tb
    inputs, idx, val = _inputs(4096 + 16, seed_offset=7)
    seen = []
    launch = be._launch_3d
    monkeypatch.setattr(be, "_launch_3d", lambda *a, **kw: (seen.append(a[-2:]), launch(*a, **kw))[1])
    default = _step(lambda *a, **kw: be.lion_step(*a, **kw), dev, inputs, idx, val)
    monkeypatch.setenv("QFT_DS_LION_M4_VEC", "0")
    bytewise = _step(lambda *a, **kw: be.lion_step(*a, **kw), dev, inputs, idx, val)
    assert seen == [(True, True), (False, True)]  # (m4_vec, keep_outliers) as launched
    for i, (a, b) in enumerate(zip(default, bytewise)):
        assert (a is None and b is None) or torch.equal(a, b), f"output {i} differs (seed {SEED})"
    monkeypatch.setenv("QFT_DS_LION_M4_VEC", "yes")
    with pytest.raises(ValueError, match="QFT_DS_LION_M4_VEC"):
        _step(lambda *a, **kw: be.lion_step(*a, **kw), dev, inputs, idx, val)
