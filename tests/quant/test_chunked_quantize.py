"""HybridWeight's quantization in row chunks (qft_ds.quant.chunked): the whole-tensor result, in a few chunks of
transient memory (issue 15: a 128k vocabulary's head set the 8B benchmark's set-up peak)."""
import sys
from pathlib import Path

import pytest
import torch

from qft_ds.ops import reference as ref
from qft_ds.quant import HybridWeight, choose_group
from qft_ds.quant import chunked
from qft_ds.quant.chunked import quantize_hybrid

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from live_bytes import LiveBytes  # noqa: E402


def whole_tensor_quantize(weight, group, outlier_frac, segments):
    """HybridWeight's quantization before the chunks: fp32 copies of the whole weight and torch.topk per segment."""
    flat = weight.detach().reshape(-1).float().clone()
    idx, start = [], 0
    for rows in segments:
        n = rows * weight.shape[1]
        k = int(round(outlier_frac * n))
        if k > 0:
            idx.append(torch.topk(flat[start:start + n].abs(), k, sorted=False).indices + start)
        start += n
    idx = torch.cat(idx).sort().values.to(torch.int32) if idx else torch.zeros(0, dtype=torch.int32)
    val = flat[idx].clone()
    flat[idx] = 0.0
    codes, scales = ref.quantize_blockwise(flat, group, "rtn")
    return codes, scales, idx, val


def heavy_tailed(rows, cols, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 0.003] *= 30
    return w.to(dtype)


# (shape, group_size, segments): groups dividing the row, an awkward width (groups across row ends, a partial
# last block), a fused projection's segments
CASES = [((300, 256), 128, None), ((97, 131), 128, None), ((40 + 24 + 24, 96), 64, [40, 24, 24])]


@pytest.mark.parametrize("shape,group_size,segments", CASES)
@pytest.mark.parametrize("chunk_elements", [500, 4096, 1 << 23])
def test_no_ties_gives_the_whole_tensor_result_bit_for_bit(shape, group_size, segments, chunk_elements):
    w = heavy_tailed(*shape)  # fp32 draws: no two |w| equal at the threshold
    segments = segments or [shape[0]]
    group = choose_group(shape[1], group_size)
    got = quantize_hybrid(w, group, 0.02, segments, chunk_elements)
    want = whole_tensor_quantize(w, group, 0.02, segments)
    for name, g, e in zip(("codes", "scales", "outlier_idx", "outlier_val"), got, want):
        assert g.dtype == e.dtype and torch.equal(g, e), name


def test_hybrid_weight_holds_the_whole_tensor_result():
    w = heavy_tailed(256, 192)
    hw = HybridWeight(w, group_size=64, outlier_frac=0.01)
    codes, scales, idx, val = whole_tensor_quantize(w, hw.group, 0.01, [256])
    a = w.abs().view(-1)
    assert (a == a[idx.long()].min()).sum() == 1  # the premise: no tie at the threshold
    assert torch.equal(hw.codes, codes) and torch.equal(hw.scales, scales)
    assert torch.equal(hw.outlier_idx, idx) and torch.equal(hw.outlier_val, val)


@pytest.mark.parametrize("chunk_elements", [300, 1 << 23])
def test_ties_keep_the_count_and_the_threshold(chunk_elements):
    """Values on a coarse grid: hundreds of elements tie at the k-th |w|. Which of them are kept may differ
    from torch.topk's (unspecified) choice; the count, the threshold and the set above it may not."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randint(-40, 41, (120, 200), generator=g) * 0.01).to(torch.bfloat16)
    segments = [50, 70]
    got = quantize_hybrid(w, 100, 0.03, segments, chunk_elements)
    want = whole_tensor_quantize(w, 100, 0.03, segments)
    a = w.float().abs().reshape(-1)
    start = 0
    for rows in segments:
        end = start + rows * 200
        g_idx = got[2][(got[2] >= start) & (got[2] < end)].long()
        e_idx = want[2][(want[2] >= start) & (want[2] < end)].long()
        assert len(g_idx) == len(e_idx) == round(0.03 * rows * 200)
        threshold = a[e_idx].min()
        assert a[g_idx].min() == threshold
        assert (a[start:end] == threshold).sum() > 1 + (a[e_idx] == threshold).sum()  # the premise: ties
        # everything strictly above the threshold is in both sets; nothing strictly below in either
        assert torch.equal(torch.isin(torch.nonzero(a[start:end] > threshold).squeeze(1) + start, g_idx),
                           torch.ones((a[start:end] > threshold).sum(), dtype=torch.bool))
        start = end
    assert torch.equal(got[3], w.float().reshape(-1)[got[2].long()])
    # the dense part is the whole-tensor quantize of the weight without the outliers chosen here
    flat = w.float().reshape(-1).clone()
    flat[got[2].long()] = 0
    codes, scales = ref.quantize_blockwise(flat, 100, "rtn")
    assert torch.equal(got[0], codes) and torch.equal(got[1], scales)


def test_ties_are_taken_in_index_order():
    w = torch.full((4, 50), 0.5)
    w[1, 7] = 2.0  # one above the tie
    _, _, idx, val = quantize_hybrid(w, 50, 0.02, [4], chunk_elements=60)  # k = 4, chunks of one row
    assert idx.tolist() == [0, 1, 2, 57] and val.tolist() == [0.5, 0.5, 0.5, 2.0]


def test_a_full_precision_weight_is_left_alone():
    w = heavy_tailed(64, 128)
    before = w.clone()
    HybridWeight(w, group_size=128, outlier_frac=0.01)
    assert torch.equal(w, before)


def test_meta_weights_give_meta_state_and_huge_weights_an_error():
    hw = HybridWeight(torch.empty(64, 96, device="meta"), group_size=32, outlier_frac=0.01)
    assert hw.codes.is_meta and hw.codes.numel() == 64 * 96 and hw.outlier_idx.numel() == round(0.01 * 64 * 96)
    with pytest.raises(ValueError, match="int32"):
        quantize_hybrid(torch.empty(1 << 16, 1 << 15, device="meta"), 128, 0.01, [1 << 16])


def test_transient_memory_is_a_few_chunks(monkeypatch):
    """Peak bytes made while quantizing, beyond the state it returns: a few fp32 chunks plus the histograms.
    The whole-tensor version makes ~12 bytes per element (a 1-D fp32 copy, |w| or the blocks' temporaries, and
    the int8 codes at once) and fails this bound."""
    chunk = 1 << 16
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk)
    w = heavy_tailed(2048, 1024, torch.bfloat16)

    def transient(build):
        with LiveBytes() as probe:
            state = build()
        return probe.peak["all"] - sum(t.numel() * t.element_size() for t in state)

    histograms = (chunked._HIGH_BINS + chunked._LOW_BINS) * 8
    bound = 4 * chunk * 4 + histograms  # measured: 3 fp32 chunks and 2 int8 ones at the dense part's peak
    hw = None

    def new():
        nonlocal hw
        hw = HybridWeight(w, group_size=128, outlier_frac=0.01)
        return hw.codes, hw.scales, hw.outlier_idx, hw.outlier_val

    assert transient(new) <= bound
    assert transient(lambda: whole_tensor_quantize(w, 128, 0.01, [2048])) > 8 * w.numel() > bound
