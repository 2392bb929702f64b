"""Model conversion: every nn.Linear and nn.Embedding of a model becomes a quantized module.

So do transformers' Conv1D (GPT-2) and the subclasses of nn.Linear / nn.Embedding whose forward int8 can
reproduce (Falcon's FalconLinear, Gemma's scaled embedding): qft_ds.nn.adapters decides. Any other weight
matrix stays fp32 and is listed, with its reason and bytes, in a warning at conversion (qft_ds.nn.coverage).
Tied weights (one Parameter read by the embedding and the LM head) become one shared HybridWeight; a weight
read by a layer that stays fp32 stays fp32 for all its readers, so it is never untied.
With `fuse_projections`, sibling projections that read the same input (FUSED_GROUPS: q/k/v_proj,
gate/up_proj) become one HybridWeight with their rows stacked, read by one matmul (FusedProjections).
Norms, biases and anything else stay fp32 Parameters. Each HybridWeight gets its global element
offset in module order, which keys stochastic rounding independently of any later sharding.

Conversion is all or nothing: every decision and every quantization is made before the model is touched,
and the modules are swapped last (undone if that fails), so a failing conversion leaves the model's modules
as they were.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from qft_ds import hf_save
from qft_ds.nn import adapters, experts
from qft_ds.nn.coverage import fp32_matrices, fp32_report, logger, mark_no_decay
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
    untied linear siblings (plain QLinear targets) of one input width, all with a bias or all without."""
    linear = {t.name: t.module for t in targets if t.kind == adapters.LINEAR}
    weight_users: dict[int, int] = {}
    for t in targets:
        if t.kind == adapters.EXPERTS:
            continue
        weight_users[id(t.module.weight)] = weight_users.get(id(t.module.weight), 0) + 1
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


@dataclass
class _Target:
    name: str
    module: nn.Module
    kind: str                   # adapters.LINEAR, EMBEDDING, CONV1D or EXPERTS
    scale: float | None = None  # an embedding's output scale (Gemma)


def plan(model: nn.Module) -> tuple[list[_Target], dict[str, str]]:
    """(the layers conversion replaces, in module order; {layer name: why it stays fp32}) for the layers it
    looked at and keeps. Changes nothing. A weight read by several layers (tied) is converted only if every
    one of its readers can be, and only if they agree on its layout."""
    targets, kept = [], {}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        verdict = adapters.classify(m) if name else None  # the root cannot be swapped
        if verdict is None:
            continue
        kind, detail = verdict
        if isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention):
            kind, detail = adapters.KEPT, "nn.MultiheadAttention reads this projection's weight, not its forward"
        if kind == adapters.KEPT:
            kept[name] = detail
        else:
            targets.append(_Target(name, m, kind, detail))
    kinds = {t.name: t.kind for t in targets}
    holders: dict[int, list] = {}  # every module holding each Parameter (tied weights: several)
    for name, m in modules.items():
        for _, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    for t in targets:
        if t.kind == adapters.EXPERTS:  # its 3-D Parameters are read by its own forward only
            continue
        names = holders[id(t.module.weight)]
        others = [n for n in names if n not in kinds]
        if others:
            n = others[0]
            why = f" ({kept[n]})" if n in kept else f" ({type(modules[n]).__name__}, not replaced)"
            kept[t.name] = f"its weight is tied to {n}, which stays fp32{why}"
        elif len({kinds[n] == adapters.CONV1D for n in names}) > 1:
            kept[t.name] = "its weight is tied to a layer that reads it transposed (Conv1D next to a Linear)"
    return [t for t in targets if t.name not in kept], kept


def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


@torch.no_grad()
def convert_model(model: nn.Module, *, group_size: int = 128, outlier_frac: float = 0.01,
                  compute_dtype: torch.dtype = torch.float32, error_feedback: bool = False,
                  progress: bool = False, device=None, fuse_projections: bool = True,
                  fetch=None, on_weight=None) -> list[HybridWeight]:
    """Replace the weight layers (see `plan`) in place; returns the HybridWeights in global-offset order.

    `device`: quantize each weight there, one at a time (load a big model on the CPU, convert straight
    onto the GPU: no full-precision copy of the model ever sits in GPU memory). Then move the model.
    `fuse_projections`: stack FUSED_GROUPS siblings into one weight each (config `qft.fuse_projections`).
    Weight matrices left in fp32 are logged as a warning (rank 0) and kept in `model._qft_fp32`.
    `fetch(module)`: the full-precision weight to quantize for a module (streaming conversion reads it from a
    checkpoint for a model whose weights are on the meta device); `on_weight(qw)`: runs on each HybridWeight
    as it is made (ZeRO-3 keeps this rank's slice). See qft_ds.nn.streaming.
    """
    if is_converted(model):
        raise ValueError("model is already converted by qft_ds")
    targets, kept = plan(model)
    if not targets:
        why = "".join(f"; {n}: {r}" for n, r in list(kept.items())[:3])
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Embedding layer qft_ds can quantize{why}")
    dense_dtype = targets[0].module.weight.dtype  # what save_pretrained writes (qft_ds.hf_save)
    by_param: dict[int, HybridWeight] = {}
    new: dict[str, nn.Module] = {}  # built first, swapped in at the end: nothing changes until all are made
    offset = 0
    it = targets
    if progress:
        from tqdm import tqdm
        it = tqdm(targets, desc="quantizing", unit="layer")
    fusable = _fusable(model, targets) if fuse_projections else {}
    groups: dict[str, tuple] = {}  # first member's name -> (FusedProjections, its HybridWeight)

    def bias_of(mod):
        return mod.bias if mod.bias is None or device is None else mod.bias.to(device)

    def weight_of(mod):
        if fetch is not None:
            return fetch(mod)
        return mod.weight.detach() if device is None else mod.weight.detach().to(device)

    for t in it:
        name, mod = t.name, t.module
        if t.kind == adapters.EXPERTS:  # one HybridWeight per expert slice (qft_ds.nn.experts)
            new[name] = experts.quantize(mod, group_size, outlier_frac, offset, error_feedback, device,
                                         compute_dtype, on_weight)
            for _, _, qw in new[name].slices():
                by_param[id(qw)] = qw
                offset += qw.numel
            continue
        if name in fusable:
            names, member = fusable[name]
            if names[0] not in groups:  # the first member quantizes the stacked weight for all
                mods = [model.get_submodule(n) if n != name else mod for n in names]
                stacked = torch.cat([weight_of(m) for m in mods])
                qw = HybridWeight(stacked, group_size, outlier_frac, global_offset=offset,
                                  segments=[m.out_features for m in mods])
                if error_feedback:
                    qw.start_carry(stacked)
                if on_weight is not None:
                    on_weight(qw)
                del stacked
                offset += qw.numel
                by_param[id(mod.weight)] = qw  # keyed by the first member's weight: returned once
                groups[names[0]] = (FusedProjections([m.out_features for m in mods]), qw)
            fused, qw = groups[names[0]]
            new[name] = QLinear(qw, bias_of(mod), compute_dtype, fused=fused, member=member)  # n_uses: per member
            continue
        qw = by_param.get(id(mod.weight))
        if qw is None:
            weight = weight_of(mod)
            qw = HybridWeight(weight, group_size, outlier_frac, global_offset=offset)
            if error_feedback:
                qw.start_carry(weight)
            if on_weight is not None:
                on_weight(qw)
            del weight
            offset += qw.numel
            by_param[id(mod.weight)] = qw
        if t.kind == adapters.LINEAR:
            new[name] = QLinear(qw, bias_of(mod), compute_dtype)
        elif t.kind == adapters.CONV1D:
            new[name] = adapters.QConv1D(qw, bias_of(mod), compute_dtype)
        elif t.scale is not None:
            new[name] = adapters.ScaledQEmbedding(qw, mod.padding_idx, t.scale)
        else:
            new[name] = QEmbedding(qw, mod.padding_idx)
    swapped = []
    try:
        for name, module in new.items():
            swapped.append((name, _set(model, name, module)))
        # norms, biases, fp32 matrices: fp32, whatever the checkpoint's dtype; one at a time, as the old
        # storage goes (if this fails, the ones already cast stay fp32: the same values)
        for p in model.parameters():
            if getattr(p, "_qft_weight", None) is None and p.dtype != torch.float32:
                p.data = p.data.float()
    except BaseException:
        for name, old in reversed(swapped):
            _set(model, name, old)
        raise
    model._qft_fuse_projections = fuse_projections  # initialize checks it against the config
    model._qft_kept = kept
    mark_no_decay(model)
    hf_save.install(model, hf_save.qft_dense, dense_dtype)  # save_pretrained: dense HF weights, not int8 state
    model._qft_fp32 = fp32_matrices(model)
    if model._qft_fp32 and int(os.environ.get("RANK", "0")) == 0:
        logger.warning(fp32_report(model, model._qft_fp32))
    return list(by_param.values())
