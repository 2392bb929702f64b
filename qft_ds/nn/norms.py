"""RMSNorm in one torch op: the LLaMA-style norms of a model become FusedRMSNorm.

HF's LlamaRMSNorm (and its copies in Mistral, Qwen2, ...) runs ~7 torch ops forward and as many autograd
nodes backward, each a kernel launch plus Python. The training step is host-bound (bench/NOTES.md), so
`torch.nn.functional.rms_norm`, one op with a C++ backward, is worth having. A norm is replaced only if
its output on a random probe (fp32 and bf16 input) equals FusedRMSNorm's: a norm with other maths
(Gemma's 1 + weight, a bias, ...) is left as it is, and so is one whose forward wants more than the one
input (Qwen3.5's gated norm) or fails on the probe. All norms are probed before any is replaced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.nn.adapters import takes_one_input


class FusedRMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back to x's dtype before the weight
    (LLaMA's order). Keeps the replaced module's `weight` Parameter, so state dict keys do not change."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            with torch.autocast(x.device.type, enabled=False):  # fp32 maths whatever autocast says
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def _eps(module: nn.Module):
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


@torch.no_grad()
def _same_function(module: nn.Module, fused: FusedRMSNorm) -> bool:
    """Whether `module(x)` equals `fused(x)` on random fp32 and bf16 input. False for a module that cannot be
    called with one tensor (a gated norm wants the gate too) or that fails on the probe."""
    if not takes_one_input(module.forward):
        return False
    gen = torch.Generator().manual_seed(0)
    dev = fused.weight.device
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 3, fused.weight.numel(), generator=gen) * 3).to(dev, dtype)
        try:
            want = module(x)
        except Exception:  # not a plain norm of one input: leave it as it is
            return False
        got = fused(x)
        if not torch.is_tensor(want) or want.dtype != got.dtype or want.shape != got.shape:
            return False
        if not torch.allclose(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6):
            return False
    return True


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every RMSNorm-named module that computes LLaMA's RMSNorm by a FusedRMSNorm; returns how many.
    Every norm is probed first; the model changes only once all probes are done."""
    chosen = []
    for name, module in model.named_modules():
        weight, eps = getattr(module, "weight", None), _eps(module)
        if (isinstance(module, FusedRMSNorm) or "rmsnorm" not in type(module).__name__.lower()
                or not isinstance(weight, nn.Parameter)
                or weight.dim() != 1 or eps is None or list(module.children())):
            continue
        fused = FusedRMSNorm(weight, eps)
        if _same_function(module, fused):
            chosen.append((name, fused))
    for name, fused in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
    return len(chosen)
