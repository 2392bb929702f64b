"""LowBitLinear: a Linear over a 3/4-bit LowBitWeight, and conversion of a model's Linear layers.

PEQA trains only the scales; QST freezes everything. In both cases autograd must not keep a
dequantized weight per layer: plain `x @ (s * (q - z)).T` would save the fp32 (q - z) tensor of every
layer for backward, a full-precision copy of the model. The Function below saves only the input and
re-dequantizes in backward, like QLinear; the scale gradient is reduced per group right away.
"""
from __future__ import annotations

import torch
from torch import nn

from qft_ds.nn.precision import linear_in
from qft_ds.quant.lowbit import LowBitWeight


class _LowBitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, weight: LowBitWeight, cdt):
        xc, y = linear_in(x, weight, cdt)
        ctx.save_for_backward(xc)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        (xc,) = ctx.saved_tensors
        weight = ctx.weight
        gy = gy.to(xc.dtype)
        gx = gs = None
        codes = weight.codes()  # unpacked once for both products
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight.dequantize(xc.dtype, codes)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gw = gy.reshape(-1, gy.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])  # one layer, freed below
            gs = weight.scale_grad(gw, codes)
        return gx, gs, None, None


class LowBitLinear(nn.Module):
    def __init__(self, qweight: LowBitWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        # Biases stay frozen fp32: PEQA trains scales only, QST trains nothing in the backbone.
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy, for code that reads `.weight`; writing to it changes nothing."""
        return self.qweight.dequantize(torch.float32)

    def forward(self, x):
        y = _LowBitLinearFn.apply(x, self.qweight.scale, self.qweight, self.compute_dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


def lowbit_modules(model: nn.Module) -> dict[str, LowBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowBitLinear)}


@torch.no_grad()
def convert_lowbit(model: nn.Module, *, bits: int = 4, group_size: int = 128, trainable_scales: bool = False,
                   compute_dtype: torch.dtype = torch.float32, quantize: bool = True) -> dict[str, LowBitLinear]:
    """Freeze every parameter and make every nn.Linear except the output head a LowBitLinear.

    The head (`get_output_embeddings()`) and the embeddings stay as they are, frozen: the head is
    usually tied to the embedding, and both are kept in full precision by PEQA and QST alike.
    `trainable_scales` (PEQA) makes each scale a Parameter; nothing else is trainable.
    `quantize=False` builds empty low-bit weights for a loader to fill (no RTN work).
    """
    if lowbit_modules(model):
        raise ValueError("model already has low-bit layers")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer (besides the output head) to quantize")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in targets:
        qw = LowBitWeight(mod.weight if quantize else None, bits, group_size, trainable_scales,
                          shape=tuple(mod.weight.shape))
        qw = qw.to(mod.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LowBitLinear(qw, mod.bias, compute_dtype))
    return lowbit_modules(model)
