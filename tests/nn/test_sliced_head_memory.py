"""The chunked loss's `keep` way dequantizes the LM head a slice of rows at a time (HeadRowSlices): the
slices hold the same values as the whole dequantize, the loss and every gradient match the unchunked loss
with many slices, and (counted by bench/live_bytes.py) no [vocab, hidden] tensor exists in the loss's
forward, where the head used to be dequantized whole (the Llama-3-8B step's peak, bench/NOTES.md)."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
import qft_ds.nn.chunked_loss as chunked_loss
from qft_ds.nn.chunked_loss import HeadRowSlices, install_chunked_loss
from qft_ds.nn.convert import convert_model, quantized_weights
from qft_ds.quant.hybrid import HybridWeight

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from live_bytes import LiveBytes  # noqa: E402

VOCAB, HIDDEN = 3000, 64


@pytest.mark.parametrize("rows,cols,group", [(300, 64, 128), (300, 131, 128), (250, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slices_hold_the_whole_dequantize_bit_for_bit(rows, cols, group, dtype):
    """Row-local groups, groups across rows (131 is prime: groups of 128 run over row ends) and outliers
    (1%) in some slices and not others."""
    g = torch.Generator().manual_seed(0)
    weight = HybridWeight(torch.randn(rows, cols, generator=g), group_size=group, outlier_frac=0.01)
    assert weight.outlier_idx.numel() > 0
    whole = weight.dequantize(dtype)
    for slice_bytes in (1, 5000, 10**9):  # one group's rows per slice, a few slices, one slice
        parts = []
        HeadRowSlices(weight, dtype, slice_bytes).each(lambda rows_, w: parts.append((rows_, w)))
        assert (len(parts) == 1) == (slice_bytes == 10**9)
        assert [p[0].start for p in parts] == sorted({p[0].start for p in parts}) and parts[-1][0].stop == rows
        for rows_, w in parts:
            assert w.dtype == dtype and torch.equal(w, whole[rows_]), rows_
        assert sum(w.shape[0] for _, w in parts) == rows


def model_pair(cdt):
    ref = make_tiny_llama(vocab=VOCAB, hidden=HIDDEN, tie=False)
    convert_model(ref, compute_dtype=cdt)
    return ref, install_chunked_loss(copy.deepcopy(ref), 8)


def batch():
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
def test_many_slices_match_the_unchunked_loss(cdt, monkeypatch):
    """10 slices of 300 rows: loss, x's gradient (summed over slices in fp32) and the head's gradient
    against HF's unchunked loss on the same int8 model, to fp32 rounding (bf16: the gradients as the
    unchunked bf16 matmuls round them, to a bf16 step)."""
    monkeypatch.setattr(chunked_loss, "HEAD_SLICE_BYTES", 300 * HIDDEN * cdt.itemsize)
    ref, model = model_pair(cdt)
    ids, labels = batch()
    assert chunked_loss.keeps_logits_grad(int((labels[:, 1:] != -100).sum()), HIDDEN, cdt)
    assert len(HeadRowSlices(model.lm_head.qweight, cdt).starts) == 10
    want, got = ref(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want.backward()
    got.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if cdt == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for w_ref, w_got in zip(quantized_weights(ref), quantized_weights(model), strict=True):
        assert w_ref.grad.abs().max() > 0
        torch.testing.assert_close(w_got.grad.float(), w_ref.grad.float(), **tol)


def test_no_head_sized_tensor_in_the_loss_forward(monkeypatch):
    """bf16 compute, few tokens (the `keep` way): in the loss's forward nothing of [vocab, hidden] elements
    is alive, and the dequantized slices are at most HEAD_SLICE_BYTES each, one at a time; the old forward
    dequantized the whole head (one bf16 [vocab, hidden]). In backward the head's bf16 gradient is the one
    head-sized tensor."""
    slice_bytes = 600 * HIDDEN * 2
    monkeypatch.setattr(chunked_loss, "HEAD_SLICE_BYTES", slice_bytes)
    _, model = model_pair(torch.bfloat16)
    ids, labels = batch()
    # the embedding's dense fp32 gradient (made last, untied here) is not the loss's
    head_sized = lambda a: a.nbytes // _itemsize(a) >= VOCAB * HIDDEN and "_QEmbeddingFn" not in a.site  # noqa: E731
    dequantized = lambda a: "HeadRowSlices" in a.site or a.site.endswith("HybridWeight.dequantize")  # noqa: E731
    for select, phase, bound in ((head_sized, "forward", 0), (dequantized, "forward", slice_bytes),
                                 (head_sized, "backward", VOCAB * HIDDEN * 2)):
        probe = LiveBytes(select)
        with probe:
            probe.phase = "forward"
            loss = model(input_ids=ids, labels=labels).loss
            probe.phase = "backward"
            loss.backward()
            del loss
        for w in quantized_weights(model):  # no optimizer: the delivered gradients are kept as .grad
            w.grad = None
        assert probe.total["all"] == 0  # everything counted was freed: the count is not stuck
        assert probe.phase_peak[phase] == bound, (phase, probe.composition(phase=phase))
    assert len(HeadRowSlices(model.lm_head.qweight, torch.bfloat16).starts) == 5


def _itemsize(a) -> int:
    return torch.empty(0, dtype=getattr(torch, a.dtype)).element_size()
