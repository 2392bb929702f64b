"""cpu_checkpointing on other transformers families (tests/nn/families.py): with every saved tensor but the
model's state moved to host memory (no size floor), two training steps through qft_ds.initialize give the
same losses and int8 state as without the offload, bit for bit. The families differ in what their
checkpointed layers take (position embeddings, masks, router state, a linear-attention cache) and in
dropout (GPT-2 trains with it: the checkpoint's RNG replay must see the same draws)."""
import json
import sys
from pathlib import Path

import pytest
import torch

import qft_ds
import qft_ds.nn.offload as offload
from qft_ds.checkpoint import state_hash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import V, make  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def train(family, cpu_checkpointing, steps=2):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["qft"]["gradient_checkpointing"] = True
    if cpu_checkpointing:
        cfg["activation_checkpointing"] = {"cpu_checkpointing": True}
    model, _ = make(family)
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    losses = []
    for i in range(steps):
        x = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(i))
        torch.manual_seed(100 + i)  # the same dropout draws in both runs
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    off = getattr(engine.module, "qft_host_offload", None)
    assert opt.step_count == steps and opt.skipped_steps == 0
    return losses, state_hash(engine.module, opt), off


@pytest.mark.parametrize("family", ["mistral", "qwen3", "phi3", "gemma3", "gpt2", "falcon", "gpt_neox", "mixtral",
                                    "deepseek_v3", "qwen3_5"])
def test_family_trains_bit_identically_with_the_offload(family, monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    want_losses, want, _ = train(family, False)
    got_losses, got, off = train(family, True)
    assert off is not None and off.offloaded_bytes > 0, "nothing was offloaded"
    assert got_losses == want_losses
    assert got == want
