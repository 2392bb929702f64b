"""QTensor and the hybrid weight quantizer."""
import pytest
import torch

from qft_ds.quant import HybridWeight, QTensor, choose_group


def test_choose_group_tiles_rows():
    assert choose_group(576, 128) == 96      # SmolLM2's hidden size is not a multiple of 128
    assert choose_group(11008, 128) == 128
    assert choose_group(64, 128) == 64
    assert choose_group(4099, 128) == 128    # prime width: groups run across row ends


def test_qtensor_shard_is_a_view_with_the_same_bits():
    x = torch.randn(1000)
    q = QTensor.quantize(x, 64)
    s = q.shard(3, 7)
    assert torch.equal(s.dequantize(), q.dequantize()[3 * 64:7 * 64])
    s.codes[0] = 5
    assert q.codes[3 * 64] == 5  # shares storage


@pytest.mark.parametrize("frac", [0.0, 0.01, 0.05])
def test_hybrid_weight_outliers_exact_and_dense_error_small(frac):
    w = torch.randn(96, 576) * 0.02
    w[torch.rand_like(w) < 0.002] *= 40  # heavy tail, like a real checkpoint
    hw = HybridWeight(w, group_size=128, outlier_frac=frac)
    assert hw.group == 96
    k = int(round(frac * w.numel()))
    assert hw.outlier_idx.numel() == k and hw.outlier_val.dtype == torch.float32
    deq = hw.dequantize()
    flat = w.reshape(-1)
    if k:
        idx = hw.outlier_idx.long()
        assert torch.equal(deq.reshape(-1)[idx], flat[idx])  # exact
        assert (hw.codes[idx] == 0).all()
        assert flat.abs()[idx].min() >= flat.abs().kthvalue(flat.numel() - k).values  # the top k
    err = ((deq - w).norm() / w.norm()).item()
    assert err < (0.02 if frac else 0.05)


def test_outliers_shrink_the_dense_step():
    w = torch.randn(64, 256) * 0.02
    w[0, 0] = 3.0
    assert HybridWeight(w, 256, 0.01).scales[0] < HybridWeight(w, 256, 0.0).scales[0] / 10


def test_state_bytes_counted_from_storage():
    hw = HybridWeight(torch.randn(256, 512), group_size=128, outlier_frac=0.01)
    n = 256 * 512
    expect = n + (n // 128) * 4 + hw.outlier_idx.numel() * 8
    assert hw.state_nbytes() == expect


def test_dequantize_rows_equals_full_dequantize_lookup():
    from qft_ds.quant.hybrid import HybridWeight
    torch.manual_seed(0)
    hw = HybridWeight(torch.randn(300, 64), group_size=32, outlier_frac=0.05)
    ids = torch.tensor([[3, 299, 3, 0], [17, 17, 250, 1]])
    want = torch.nn.functional.embedding(ids, hw.dequantize())
    assert torch.equal(hw.dequantize_rows(ids), want)
    odd = HybridWeight(torch.randn(30, 20), group_size=16, outlier_frac=0.05)  # groups straddle rows
    assert torch.equal(odd.dequantize_rows(ids % 30), torch.nn.functional.embedding(ids % 30, odd.dequantize()))
