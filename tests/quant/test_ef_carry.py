"""Error feedback's starting carry: the forward weight must move with the first updates, as SR's does."""
import pytest
import torch

from qft_ds.ops import reference as ref
from qft_ds.quant.hybrid import HybridWeight


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * 0.02
    return w, HybridWeight(w, group_size=64, outlier_frac=0.01)


def scales_of(qw):
    return qw.scales.repeat_interleave(qw.group)[: qw.numel]


def test_the_carry_holds_what_rounding_dropped():
    w, qw = make()
    qw.start_carry(w)
    s = scales_of(qw)
    dense = qw.codes.float() * s
    exact = w.reshape(-1).clone()
    exact[qw.outlier_idx.long()] = 0.0
    with_carry = dense + qw.residual.float() * s / 254
    assert ((with_carry - exact).abs() <= s / 254 + 1e-9).all()  # one carry step (stochastic rounding)
    assert (dense - exact).abs().max() > 0.3 * s.max()            # the codes alone are off by up to s/2
    assert (qw.residual[qw.outlier_idx.long()] == 0).all()


@pytest.mark.parametrize("carry", ["from_weight", "unknown", "zero"])
def test_the_forward_weight_moves_by_lr_from_the_first_steps(carry):
    """A constant-sign gradient at lr = 0.02 of the median int8 step, 10 steps: with a carry that
    starts where rounding left the weight (or uniformly, when that is unknown) the forward weight moves
    by 10 lr on average, as with SR; a zero carry held it still (the lag behind the low-lr EF runs)."""
    w, qw = make(1)
    if carry == "from_weight":
        qw.start_carry(w)
    elif carry == "unknown":
        qw.start_carry()
    else:
        qw.residual = torch.zeros_like(qw.codes)
    s0 = scales_of(qw)
    lr = 0.02 * s0.median().item()
    before = qw.codes.float() * s0
    n = qw.numel
    m_codes, m_scales = torch.zeros(n, dtype=torch.int8), torch.zeros(-(-n // 256))
    for step in range(10):
        ref.lion_step(qw.codes, qw.scales, qw.group, m_codes, m_scales, 256, torch.ones(n), lr=lr, beta1=0.9,
                      beta2=0.99, weight_decay=0.0, rounding="ef", seed=0, step=step, offset=0,
                      outlier_idx=qw.outlier_idx, outlier_val=qw.outlier_val, residual=qw.residual)
    dense = torch.ones(n, dtype=torch.bool)
    dense[qw.outlier_idx.long()] = False
    moved = ((qw.codes.float() * scales_of(qw) - before)[dense].mean() / (-10 * lr)).item()
    if carry == "zero":
        assert moved < 0.1
    else:
        assert moved == pytest.approx(1.0, abs=0.1)
