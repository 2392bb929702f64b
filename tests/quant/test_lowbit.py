"""3/4-bit asymmetric RTN codes: error bounds, exact zero, packing, partial groups, scale gradient."""
import pytest
import torch

from qft_ds.nn.lowbit import LowBitLinear, convert_lowbit
from qft_ds.quant.lowbit import (LowBitWeight, dequantize_asym, effective_group, pack_nibbles, quantize_asym,
                                 unpack_nibbles)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [0, 4, 7, 128])
def test_rtn_error_is_at_most_half_a_step(bits, group_size):
    w = torch.randn(5, 20)
    group = effective_group(20, group_size)
    codes, scales, zeros = quantize_asym(w, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scales.shape == zeros.shape == (5, -(-20 // group))
    step = scales.repeat_interleave(group, dim=1)[:, :20]
    err = (dequantize_asym(codes, scales, zeros, group) - w).abs()
    assert bool((err <= step / 2 + 1e-6).all())


def test_zero_and_constant_groups_are_exact():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3], [-1.0, 0.0, 0.5, 2.0]])
    codes, scales, zeros = quantize_asym(w, 4, 4)
    back = dequantize_asym(codes, scales, zeros, 4)
    assert torch.equal(back[0], w[0])
    assert torch.allclose(back[1], w[1])
    assert back[2, 1] == 0.0  # the range includes 0, so zero is on the grid


def test_partial_last_group_keeps_its_own_scale():
    w = torch.ones(2, 10)
    w[:, 8:] = 100.0  # the partial group [8:10] must not widen the step of the full groups
    codes, scales, zeros = quantize_asym(w, 4, 4)
    assert scales.shape == (2, 3)
    assert torch.allclose(dequantize_asym(codes, scales, zeros, 4), w)


@pytest.mark.parametrize("n", [1, 6, 7])
def test_nibble_packing_round_trips_and_counts_half_a_byte(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.numel() == -(-n // 2)
    assert torch.equal(unpack_nibbles(packed, n), codes)


def test_state_bytes_are_half_a_byte_plus_group_overhead():
    qw = LowBitWeight(torch.randn(64, 256), bits=4, group_size=128)
    assert qw.state_nbytes() == 64 * 256 // 2 + 64 * 2 * (4 + 1)  # codes + fp32 scale + uint8 zero per group


def test_lowbit_linear_scale_gradient_matches_autograd():
    w = torch.randn(6, 10)
    qw = LowBitWeight(w, bits=4, group_size=4, trainable_scale=True)
    layer = LowBitLinear(qw)
    x = torch.randn(3, 10, requires_grad=True)
    layer(x).square().sum().backward()
    s = qw.scale.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ dequantize_asym(qw.codes(), s, qw.zeros, qw.group).t()).square().sum().backward()
    assert torch.allclose(qw.scale.grad, s.grad, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_lowbit_linear_output_dtype_follows_autocast_like_qlinear():
    """fp32 input: fp32 out without autocast (as nn.Linear); bf16 out under bf16 autocast, so activations
    after it are kept in bf16 (fp32 outputs had PEQA keep ~25% more activation bytes than QFT)."""
    qw = LowBitWeight(torch.randn(8, 16), bits=4, group_size=8, trainable_scale=True)
    layer = LowBitLinear(qw, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 16, requires_grad=True)
    assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and qw.scale.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_convert_lowbit_keeps_the_head_and_freezes_everything(tiny_llama):
    model = tiny_llama()
    layers = convert_lowbit(model, bits=4, group_size=16, trainable_scales=True)
    assert len(layers) == 2 * 7 and type(model.lm_head) is torch.nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.qweight.scale" for n in layers}
    with pytest.raises(ValueError, match="already has low-bit layers"):
        convert_lowbit(model)
