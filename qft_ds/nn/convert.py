"""Model conversion: every nn.Linear and nn.Embedding of a model becomes a quantized module.

Tied weights (one Parameter read by the embedding and the LM head) become one shared HybridWeight.
Norms, biases and anything else stay fp32 Parameters. Each HybridWeight gets its global element
offset in module order, which keys stochastic rounding independently of any later sharding.
"""
from __future__ import annotations

import torch
from torch import nn

from qft_ds.nn.qmodules import QEmbedding, QLinear
from qft_ds.quant.hybrid import HybridWeight


def quantized_weights(model: nn.Module) -> list[HybridWeight]:
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, HybridWeight) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def is_converted(model: nn.Module) -> bool:
    return bool(quantized_weights(model))


@torch.no_grad()
def convert_model(model: nn.Module, *, group_size: int = 128, outlier_frac: float = 0.01,
                  compute_dtype: torch.dtype = torch.float32, error_feedback: bool = False,
                  progress: bool = False, device=None) -> list[HybridWeight]:
    """Replace Linear/Embedding modules in place; returns the HybridWeights in global-offset order.

    `device`: quantize each weight there, one at a time (load a big model on the CPU, convert straight
    onto the GPU: no full-precision copy of the model ever sits in GPU memory). Then move the model.
    """
    if is_converted(model):
        raise ValueError("model is already converted by qft_ds")
    targets = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Embedding layer to quantize")
    by_param: dict[int, HybridWeight] = {}
    offset = 0
    it = targets
    if progress:
        from tqdm import tqdm
        it = tqdm(targets, desc="quantizing", unit="layer")
    for name, mod in it:
        qw = by_param.get(id(mod.weight))
        if qw is None:
            weight = mod.weight if device is None else mod.weight.to(device)
            qw = HybridWeight(weight, group_size, outlier_frac, global_offset=offset)
            del weight
            if error_feedback:
                qw.residual = torch.zeros_like(qw.codes)
            offset += qw.numel
            by_param[id(mod.weight)] = qw
        if isinstance(mod, nn.Linear):
            bias = mod.bias if mod.bias is None or device is None else mod.bias.to(device)
            new = QLinear(qw, bias, compute_dtype)
        else:
            new = QEmbedding(qw, mod.padding_idx)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for p in model.parameters():
        if not hasattr(p, "_qft_weight"):
            p.data = p.data.float()  # norms and biases: fp32, whatever the checkpoint's dtype
    return list(by_param.values())
