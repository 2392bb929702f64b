"""The chunked loss's memory bound, counted by bench/logits_probe.py: during forward and backward no fp32
tensor of shape [*, vocab] has more than chunk rows, where the unchunked loss makes [tokens, vocab] ones.
And bench/chunked_loss_memory.py runs at a tiny size and writes what its docstring says."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
import qft_ds.nn.chunked_loss as chunked_loss
from qft_ds.nn.chunked_loss import install_chunked_loss
from qft_ds.nn.convert import convert_model, quantized_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chunked_loss_memory  # noqa: E402
from logits_probe import LogitsProbe  # noqa: E402

VOCAB = 300  # not the hidden size (64), so [*, vocab] tensors are logits, not weights


def forward_backward(model, ids, labels) -> LogitsProbe:
    probe = LogitsProbe(VOCAB)
    with probe:
        model(input_ids=ids, labels=labels).loss.backward()
    return probe


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "sum"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [4, 7])
def test_no_fp32_logits_beyond_one_chunk(tie, chunk, keep, monkeypatch):
    """fp32 compute. `sum`: no fp32 [*, vocab] tensor beyond a chunk. `keep`: the logits' gradient of the
    kept tokens (in the compute dtype, here fp32) besides."""
    monkeypatch.setattr(chunked_loss, "keeps_logits_grad", lambda *a: keep)
    ref = make_tiny_llama(vocab=VOCAB, tie=tie)
    convert_model(ref)
    model = install_chunked_loss(copy.deepcopy(ref), chunk)
    ids = torch.randint(0, VOCAB, (3, 16))
    labels = ids.clone()
    labels[:, :3] = -100
    tokens = ids.numel()
    kept = int((labels[:, 1:] != -100).sum())
    whole = forward_backward(ref, ids, labels)
    # the probe sees the unchunked logits whole: it can see what it is asked to bound
    assert whole.largest_fp32 >= tokens * VOCAB
    chunked = forward_backward(model, ids, labels)
    kept_bytes = kept * VOCAB * 4 if keep else 0
    assert 0 < chunked.largest_fp32 <= (kept if keep else chunk) * VOCAB, chunked.largest_shape
    # every logits-sized tensor alive at once, of any dtype: a few chunks' worth, not a few sequences'
    assert chunked.peak_bytes <= kept_bytes + 6 * chunk * VOCAB * 4 < whole.peak_bytes  # 5 chunks here
    assert not chunked.live and not whole.live  # all freed after backward: the count is not stuck


def test_probe_counts_saved_tensors_until_backward():
    """A tensor autograd saves stays counted after its Python name is gone, until backward frees it."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(VOCAB, 16)
    probe = LogitsProbe(VOCAB)
    with probe:
        loss = torch.nn.functional.cross_entropy(x @ w.t(), torch.zeros(8, dtype=torch.long))
        alive = probe.live_bytes  # the log-softmax output, saved for backward
        loss.backward()
    assert alive == 8 * VOCAB * 4
    assert probe.live_bytes == 0 and probe.largest_fp32 == 8 * VOCAB  # w.t() [16, vocab] is not logits


def test_bench_script_writes_its_result(tmp_path):
    path = chunked_loss_memory.main(["--vocab", "500", "--hidden", "64", "--seq", "32", "--chunk", "8",
                                     "--steps", "1", "--no-bf16", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    whole, chunked = result["runs"]
    assert (whole["chunk"], chunked["chunk"]) == (0, 8)
    # fp32 compute, fewer kept tokens than hidden units: the kept logits' gradient (fp32) is the largest
    assert chunked["largest_fp32_logits_elements"] <= result["kept_tokens"] * 500 < whole["largest_fp32_logits_elements"]
    assert result["logits_peak_ratio"] == chunked["logits_peak_bytes"] / whole["logits_peak_bytes"] < 1
    assert result["step_time_ratio"] > 0 and result["kept_tokens"] == 2 * (32 - 32 // 4)
    assert result["max_loss_rel_diff"] < 1e-5


def test_head_sized_tensors_one_bf16_copy_at_a_time():
    """bf16 compute, few tokens (the `keep` way, chosen by bytes), counted by bench/live_bytes.py: the
    chunked loss holds at most one [vocab, hidden] tensor at a time, in bf16 (the dequantized head in
    forward, its gradient in backward), where summing the head's gradient over chunks in fp32 held an fp32
    one beside the bf16 head, then beside its bf16 copy. The logits-sized tensors: the bf16 logits' gradient
    of the kept tokens and a few chunks' fp32."""
    from live_bytes import LiveBytes
    vocab, hidden, chunk = 3000, 64, 8
    model = make_tiny_llama(vocab=vocab, hidden=hidden, tie=False)
    convert_model(model, compute_dtype=torch.bfloat16)
    install_chunked_loss(model, chunk)
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    kept = int((labels[:, 1:] != -100).sum())
    assert chunked_loss.keeps_logits_grad(kept, hidden, torch.bfloat16)

    def counted(select):
        probe = LiveBytes(select)
        with probe:
            model(input_ids=ids, labels=labels).loss.backward()
        for w in quantized_weights(model):  # no optimizer: the delivered gradients are kept as .grad
            w.grad = None
        assert probe.total["all"] == 0  # everything counted was freed: the count is not stuck
        return probe

    # the embedding's own dense fp32 gradient (made last, untied here) is not the loss's
    head = counted(lambda a: a.nbytes // _itemsize(a) == vocab * hidden and "_QEmbeddingFn" not in a.site)
    # device counts: add_mm_fp32's CPU stand-in upcasts its bf16 operands to fp32 (a GPU does not)
    assert head.peak["device"] == vocab * hidden * 2, head.composition("device")
    logits = counted(lambda a: bool(a.shape) and a.shape[-1] == vocab and a.nbytes // _itemsize(a) != vocab * hidden)
    assert kept * vocab * 2 < logits.peak["device"] <= kept * vocab * 2 + 4 * chunk * vocab * 4, logits.composition("device")


def _itemsize(a) -> int:
    return torch.empty(0, dtype=getattr(torch, a.dtype)).element_size()
