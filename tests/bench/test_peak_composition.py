"""bench/live_bytes.py counts what torch keeps alive; bench/peak_composition.py runs at the tiny shape and
writes what its docstring says."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import peak_composition  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402


def test_counts_saved_tensors_until_backward_and_views_once():
    x = torch.randn(64, 32, requires_grad=True)
    probe = LiveBytes()
    with probe:
        y = (x * 2).exp()        # exp saves its output [64, 32] for backward; x * 2 is freed
        view = y.view(-1)        # a view: no new storage
        alive = probe.total["all"]
        del view
        y.sum().backward()
        del y
        assert probe.total["all"] == x.grad.nbytes  # only x's gradient is left
        x.grad = None
    assert alive == 64 * 32 * 4
    assert probe.total["all"] == 0 and probe.peak["all"] >= 2 * 64 * 32 * 4  # freed; the product and exp at once
    assert probe.peak["device"] == probe.peak["all"]  # no kernel stand-in ran


def test_kernel_temporaries_leave_the_device_count():
    from qft_ds.ops import reference
    codes = torch.randint(-127, 128, (4096,), dtype=torch.int8)
    scales = torch.rand(16)
    probe = LiveBytes()
    with probe:
        w = reference.dequantize_blockwise(codes[:4000], scales, 256)  # the padded path makes fp32 temporaries
        y = w * 1.0  # read outside the kernel: w is the kernel's output and counts on the device from here
    assert probe.peak["all"] > probe.peak["device"] >= w.numel() * 4 + y.numel() * 4


def test_tiny_run_writes_its_result(tmp_path):
    path = peak_composition.main(["--shape", "tiny", "--seq", "48", "--chunks", "0", "16", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    whole, chunked = result["runs"]
    assert (whole["chunked_loss"], chunked["chunked_loss"]) == (0, 16) and len(whole["steps"]) == 2
    assert 1 < whole["state_bytes_per_param"] < 2.3 and result["full_shape"]["layers"] == 2
    for run in result["runs"]:
        for step in run["steps"]:
            assert 0 < step["device"]["peak_bytes"] <= step["all"]["peak_bytes"]
            assert sum(b for b, _ in step["device"]["categories"].values()) == step["device"]["peak_bytes"]
            assert "backward (norm pass)" in step["device_by_phase"] or step["step"] > 0  # clipping's step-0 pass
    # the unchunked loss makes [tokens, vocab] fp32 logits; the chunked one keeps a bf16 gradient instead
    # (seq 48: 96 tokens x vocab 1000 is not the head's 1000 x 128, which 128 tokens would be)
    whole_logits = [k for s in whole["steps"] for k in s["device_by_phase"]["forward"]["categories"]]
    assert "logits float32" in whole_logits
    chunked_fwd = chunked["steps"][1]["device_by_phase"]["forward"]["categories"]
    assert "logits' gradient kept for backward bfloat16 (chunked loss)" in chunked_fwd
