"""QLinear and QEmbedding: modules over a HybridWeight whose gradients leave autograd in backward.

Forward dequantizes the weight to the compute dtype (bf16 or fp32) for one matmul and frees it.
Backward computes grad_input with a fresh dequantization, then grad_weight, and hands grad_weight to
the flow (qft_ds.flow.deliver); autograd never sees it, so no model-sized gradient ever exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.flow import deliver
from qft_ds.quant.hybrid import HybridWeight


class _QLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, weight: HybridWeight, cdt):
        xc = x.to(cdt)
        ctx.save_for_backward(xc)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        y = F.linear(xc, weight.dequantize(cdt))
        # Out in the input's dtype, as torch.nn.Linear: a bf16 q/v next to an fp32 k (after fp32 RoPE)
        # breaks attention. Under autocast, stay in the compute dtype like every autocast matmul.
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        (xc,) = ctx.saved_tensors
        weight = ctx.weight
        gy = gy.to(xc.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            # grad_input first: the fused flow may update this weight as soon as it gets grad_weight.
            gx = (gy @ weight.dequantize(xc.dtype)).to(ctx.x_dtype)
        gw = gy.reshape(-1, gy.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])
        deliver(weight, gw)  # in the compute dtype: the Lion kernel upcasts in registers (6 B/param, not 8)
        return gx, None, None, None


class _QEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, anchor, weight: HybridWeight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return weight.dequantize_rows(ids)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=gy.device)
        gw.index_add_(0, ids.reshape(-1), gy.reshape(-1, gy.shape[-1]).float())
        if ctx.padding_idx is not None:
            gw[ctx.padding_idx] = 0.0
        deliver(weight, gw)
        return None, None, None, None


class QLinear(nn.Module):
    def __init__(self, qweight: HybridWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = nn.Parameter(bias.detach().float()) if bias is not None else None
        self.compute_dtype = compute_dtype
        qweight.n_uses += 1

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy, for code that reads `.weight`; writing to it changes nothing."""
        return self.qweight.dequantize(torch.float32)

    def forward(self, x):
        y = _QLinearFn.apply(x, self.qweight.anchor, self.qweight, self.compute_dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


class QEmbedding(nn.Module):
    def __init__(self, qweight: HybridWeight, padding_idx: int | None = None):
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        qweight.n_uses += 1

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize(torch.float32)

    def forward(self, ids):
        # fp32 out: the residual stream stays fp32, matmuls run in the compute dtype.
        return _QEmbeddingFn.apply(ids, self.qweight.anchor, self.qweight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
