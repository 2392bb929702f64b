"""bf16 compute for a converted model: its forward runs under torch.autocast(bfloat16).

The quantized matmuls already run in bf16. Autocast puts the rest of the model's matmuls (attention's
SDPA: flash attention needs q, k, v in bf16) in bf16 too, while the residual stream, norms and loss stay
fp32: the same numerics as the fp32-master + autocast recipe it is compared with. Without it, RoPE in
fp32 makes q and k fp32 next to a bf16 v. Gradient checkpointing recomputes under the same autocast
state (torch.utils.checkpoint saves it).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def autocast_forward(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Wrap `model.forward` (once) so every call runs under autocast on the model's device type."""
    if getattr(model.forward, "_qft_autocast", None) == dtype:
        return model
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    autocast_forward._qft_autocast = dtype
    model.forward = autocast_forward
    return model


def linear_in(x: torch.Tensor, weight, cdt: torch.dtype):
    """(x in the compute dtype `cdt`, x @ W^T) for a quantized weight dequantized to `cdt`. Out in x's dtype,
    as torch.nn.Linear: a bf16 q/v next to an fp32 k (after fp32 RoPE) breaks attention (SDPA). Under
    autocast, out in the compute dtype like every autocast matmul: fp32 outputs made the MLP and attention
    keep fp32 activations for backward."""
    xc = x.to(cdt)
    y = F.linear(xc, weight.dequantize(cdt))
    return xc, (y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype))
