"""FusedRMSNorm: the same function as HF's LlamaRMSNorm, swapped in only where a probe says so."""
import pytest
import torch
from torch import nn

from qft_ds.nn.norms import FusedRMSNorm, fuse_rms_norms


def _hf_norm(d=48):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(d, eps=1e-5)
    norm.weight.data = torch.randn(d)  # not ones: the weight must be applied
    return norm


class GemmaLikeRMSNorm(nn.Module):
    """Other maths under an RMSNorm name: (1 + weight), as Gemma's. Must not be replaced."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.eps = 1e-6

    def forward(self, x):
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)) * (1 + self.weight)).to(x.dtype)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_norm_matches_llama_rmsnorm_forward_and_backward(autocast):
    torch.manual_seed(0)
    hf = _hf_norm()
    fused = FusedRMSNorm(nn.Parameter(hf.weight.detach().clone()), hf.variance_epsilon)
    x = torch.randn(4, 9, 48) * 2
    gy = torch.randn(4, 9, 48)
    outs = []
    for mod in (hf, fused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = mod(xi)
        (y.float() * gy).sum().backward()
        outs.append((y, xi.grad, mod.weight.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        assert ((a - b).norm() / b.norm()).item() < 1e-6


def test_fuse_replaces_llama_norms_keeps_keys_and_skips_other_maths(tiny_llama):
    model = tiny_llama(tie=False)
    model.layers_extra = GemmaLikeRMSNorm(model.config.hidden_size)
    keys = set(model.state_dict())
    x = torch.randint(0, 128, (2, 16))
    want = model(input_ids=x).logits
    n_norms = 2 * model.config.num_hidden_layers + 1
    assert fuse_rms_norms(model) == n_norms
    assert isinstance(model.model.norm, FusedRMSNorm) and isinstance(model.layers_extra, GemmaLikeRMSNorm)
    assert set(model.state_dict()) == keys
    assert torch.allclose(model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    assert fuse_rms_norms(model) == 0  # already fused


@pytest.mark.parametrize("on", [True, False])
def test_config_key_fuse_norms(tiny_llama, on):
    from qft_ds.config import QFTConfig
    from qft_ds.engine import prepare_model
    model = tiny_llama(tie=False)
    prepare_model(model, QFTConfig.from_dict({"fuse_norms": on}))
    assert isinstance(model.model.norm, FusedRMSNorm) == on
    with pytest.raises(ValueError, match="fuse_norms"):
        QFTConfig.from_dict({"fuse_norms": "yes"})
