"""bench/sliced_ops.py: the reference Lion step run slice by slice writes the same bits as one call."""
import sys
from pathlib import Path

import pytest
import torch

from qft_ds.ops import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from sliced_ops import sliced_lion_step  # noqa: E402


def state(n, w_block, m_block, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_codes, w_scales = ref.quantize_blockwise(torch.randn(n, generator=g), w_block)
    m_codes, m_scales = ref.quantize_momentum(torch.randn(n, generator=g) * 1e-3, m_block, 7, 0, bits)
    idx = torch.randperm(n, generator=g)[: n // 100].sort().values.to(torch.int32)
    w_codes[idx.long()] = 0
    return dict(w_codes=w_codes, w_scales=w_scales, m_codes=m_codes, m_scales=m_scales,
                outlier_idx=idx, outlier_val=torch.randn(idx.numel(), generator=g))


@pytest.mark.parametrize("bits", [4, 8])
def test_sliced_lion_step_is_bit_identical(bits):
    n, w_block, m_block = 96 * 250, 96, 256
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole, sliced = state(n, w_block, m_block, bits), state(n, w_block, m_block, bits)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=3, step=5, offset=1536,
              momentum_bits=bits)
    for st, fn in ((whole, ref.lion_step), (sliced, sliced_lion_step(ref.lion_step, 5000))):
        fn(st["w_codes"], st["w_scales"], w_block, st["m_codes"], st["m_scales"], m_block, grad,
           outlier_idx=st["outlier_idx"], outlier_val=st["outlier_val"], **kw)
    start = state(n, w_block, m_block, bits)
    assert not torch.equal(whole["w_codes"], start["w_codes"])  # the step moved the weight
    for k in whole:
        assert torch.equal(whole[k], sliced[k]), k
