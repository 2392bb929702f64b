"""The chunked loss on other transformers families (tests/nn/families.py): the ones whose logits are
lm_head(hidden) and whose loss is HF's give the unchunked loss and gradients; the others are refused by
name at install, never trained with a different loss."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from qft_ds.nn.chunked_loss import install_chunked_loss
from qft_ds.nn.convert import convert_model, quantized_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import V, make  # noqa: E402


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3", "falcon", "gpt2",
                                    "mixtral", "granite"])
def test_family_matches_unchunked(family):
    ref, _ = make(family)
    convert_model(ref)
    model = install_chunked_loss(copy.deepcopy(ref), 5)
    ids = torch.randint(3, V, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    torch.manual_seed(5)  # the same dropout masks (GPT-2 trains with dropout)
    want = ref(input_ids=ids, labels=labels)
    torch.manual_seed(5)
    got = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    want.loss.backward()
    got.loss.backward()
    pairs = [(a.grad, b.grad) for a, b in zip(quantized_weights(model), quantized_weights(ref)) if b.grad is not None]
    assert pairs
    for g_got, g_want in pairs:
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6 * g_want.abs().max().item())


@pytest.mark.parametrize("family,match", [("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale"),
                                          ("phi", "without bias")])
def test_family_whose_logits_differ_is_refused(family, match):
    model, _ = make(family)
    convert_model(model)
    with pytest.raises(ValueError, match=match):
        install_chunked_loss(model, 5)
