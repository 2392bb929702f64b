"""QLinear and QEmbedding: modules over a HybridWeight whose gradients leave autograd in backward.

Forward dequantizes the weight to the compute dtype (bf16 or fp32) for one matmul and frees it.
Backward computes grad_input with a fresh dequantization, then grad_weight, and hands grad_weight to
the flow (qft_ds.flow.deliver); autograd never sees it, so no model-sized gradient ever exists.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.flow import deliver
from qft_ds.quant.hybrid import HybridWeight


class _QLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, weight: HybridWeight, cdt, keep_weight: bool):
        xc = x.to(cdt)
        w = weight.dequantize(cdt)
        # keep_weight (inside a checkpointed layer only): the recompute's dequantized weight serves the
        # backward too, one dequantize fewer per step. The first forward's copy is not kept: checkpointing
        # drops what it saves. Elsewhere this would hold every layer's weight until backward.
        ctx.save_for_backward(xc, w) if keep_weight else ctx.save_for_backward(xc)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        y = F.linear(xc, w)
        # Out in the input's dtype, as torch.nn.Linear: a bf16 q/v next to an fp32 k (after fp32 RoPE)
        # breaks attention. Under autocast, stay in the compute dtype like every autocast matmul.
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        xc, *kept = ctx.saved_tensors
        weight = ctx.weight
        gy = gy.to(xc.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            # grad_input first: the fused flow may update this weight as soon as it gets grad_weight.
            w = kept[0] if kept else weight.dequantize(xc.dtype)
            gx = (gy @ w).to(ctx.x_dtype)
        del kept
        gw = gy.reshape(-1, gy.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])
        deliver(weight, gw)  # in the compute dtype: the Lion kernel upcasts in registers (6 B/param, not 8)
        return gx, None, None, None, None


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
        ref = _CHECKPOINTED_LAYER.get(self)
        layer = ref() if ref is not None else None
        # read each call: gradient_checkpointing_disable() must stop the reuse, or every weight is kept
        keep = (layer is not None and getattr(layer, "gradient_checkpointing", False) and layer.training
                and torch.is_grad_enabled())
        y = _QLinearFn.apply(x, self.qweight.anchor, self.qweight, self.compute_dtype, keep)
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


# QLinear -> weakref to its enclosing checkpointed layer. Kept outside the modules so that they still
# pickle, and a deepcopy (new modules, not in here) never reads another model's layer.
_CHECKPOINTED_LAYER: "weakref.WeakKeyDictionary[QLinear, weakref.ref]" = weakref.WeakKeyDictionary()


def mark_checkpointed(model: nn.Module) -> int:
    """Flag the QLinears inside transformers layers that run under gradient checkpointing, so their
    backward reuses the recompute's dequantized weight (one dequantize fewer per weight and step). Call
    after gradient_checkpointing_enable(); returns how many were flagged. A layer checkpointed some other
    way is simply not flagged: it dequantizes once more in backward, as before."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no per-layer flag to read
        return 0
    flagged = 0
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and getattr(layer, "gradient_checkpointing", False):
            for m in layer.modules():
                if isinstance(m, QLinear):
                    _CHECKPOINTED_LAYER[m] = weakref.ref(layer)
                    flagged += 1
    return flagged
