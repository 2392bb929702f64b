"""Model conversion: every nn.Linear and nn.Embedding of a model becomes a quantized module.

Tied weights (one Parameter read by the embedding and the LM head) become one shared HybridWeight.
With `fuse_projections`, sibling projections that read the same input (FUSED_GROUPS: q/k/v_proj,
gate/up_proj) become one HybridWeight with their rows stacked, read by one matmul (FusedProjections).
Norms, biases and anything else stay fp32 Parameters. Each HybridWeight gets its global element
offset in module order, which keys stochastic rounding independently of any later sharding.
"""
from __future__ import annotations

import torch
from torch import nn

from qft_ds import hf_save
from qft_ds.nn.qmodules import FusedProjections, QEmbedding, QLinear
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


# Children of one module, by name, that the module's forward calls with the same input (LLaMA, Mistral,
# Qwen2, Gemma, ...). Fusing is only a speed-up: a member called with another input still gets the right
# output (FusedProjections), so a model that reuses these names differently stays correct.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, QLinear) and m.fused is not None for m in model.modules())


def _fusable(model: nn.Module, targets: list) -> dict:
    """{child name: (group names, member index)} for every FUSED_GROUPS group found whole under one parent:
    plain untied nn.Linear siblings of one input width, all with a bias or all without."""
    linear = {name: m for name, m in targets if type(m) is nn.Linear}
    weight_users: dict[int, int] = {}
    for _, m in targets:
        weight_users[id(m.weight)] = weight_users.get(id(m.weight), 0) + 1
    out = {}
    for parent_name, _ in model.named_modules():
        pre = f"{parent_name}." if parent_name else ""
        for group in FUSED_GROUPS:
            mods = [linear.get(pre + n) for n in group]
            if (all(m is not None for m in mods) and len({m.in_features for m in mods}) == 1
                    and len({m.bias is None for m in mods}) == 1
                    and len({m.weight.dtype for m in mods}) == 1
                    and all(weight_users[id(m.weight)] == 1 for m in mods)):
                names = [pre + n for n in group]
                for i, n in enumerate(names):
                    out[n] = (names, i)
    return out


@torch.no_grad()
def convert_model(model: nn.Module, *, group_size: int = 128, outlier_frac: float = 0.01,
                  compute_dtype: torch.dtype = torch.float32, error_feedback: bool = False,
                  progress: bool = False, device=None, fuse_projections: bool = True) -> list[HybridWeight]:
    """Replace Linear/Embedding modules in place; returns the HybridWeights in global-offset order.

    `device`: quantize each weight there, one at a time (load a big model on the CPU, convert straight
    onto the GPU: no full-precision copy of the model ever sits in GPU memory). Then move the model.
    `fuse_projections`: stack FUSED_GROUPS siblings into one weight each (config `qft.fuse_projections`).
    """
    if is_converted(model):
        raise ValueError("model is already converted by qft_ds")
    targets = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Embedding layer to quantize")
    dense_dtype = targets[0][1].weight.dtype  # what save_pretrained writes (qft_ds.hf_save)
    by_param: dict[int, HybridWeight] = {}
    offset = 0
    it = targets
    if progress:
        from tqdm import tqdm
        it = tqdm(targets, desc="quantizing", unit="layer")
    fusable = _fusable(model, targets) if fuse_projections else {}
    groups: dict[str, tuple] = {}  # first member's name -> (FusedProjections, its HybridWeight)
    for name, mod in it:
        if name in fusable:
            names, member = fusable[name]
            if names[0] not in groups:  # the first member quantizes the stacked weight for all
                mods = [model.get_submodule(n) if n != name else mod for n in names]
                stacked = torch.cat([m.weight.detach() if device is None else m.weight.detach().to(device)
                                     for m in mods])
                qw = HybridWeight(stacked, group_size, outlier_frac, global_offset=offset,
                                  segments=[m.out_features for m in mods])
                del stacked
                if error_feedback:
                    qw.residual = torch.zeros_like(qw.codes)
                offset += qw.numel
                by_param[id(mod.weight)] = qw  # keyed by the first member's weight: returned once
                groups[names[0]] = (FusedProjections([m.out_features for m in mods]), qw)
            fused, qw = groups[names[0]]
            bias = mod.bias if mod.bias is None or device is None else mod.bias.to(device)
            new = QLinear(qw, bias, compute_dtype, fused=fused, member=member)  # n_uses: one per member
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            continue
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
    model._qft_fuse_projections = fuse_projections  # initialize checks it against the config
    hf_save.install(model, hf_save.qft_dense, dense_dtype)  # save_pretrained: dense HF weights, not int8 state
    for p in model.parameters():
        if not hasattr(p, "_qft_weight"):
            p.data = p.data.float()  # norms and biases: fp32, whatever the checkpoint's dtype
    return list(by_param.values())
