"""The int8 layout of a converted model, as checkpoints, exports and save_pretrained record it: each
HybridWeight under the state-dict prefix of its first reader, with its shape, group, global offset and
the modules that read it (and their rows, for fused projections), or the MoE experts Parameter it is one
expert's slice of ("expert": [name, expert, number of experts]; qft_ds.nn.experts)."""
from __future__ import annotations

from torch import nn

from qft_ds.nn.experts import layout_entries
from qft_ds.nn.qmodules import QEmbedding, QLinear
from qft_ds.quant.hybrid import HybridWeight


def weights_by_prefix(model: nn.Module) -> dict:
    """{state-dict prefix: HybridWeight}, a tied weight under its first name only."""
    out, seen = {}, set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, HybridWeight) and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def quant_layout(model: nn.Module) -> dict:
    """For each HybridWeight: its state-dict prefix, the modules that read it, shape and group."""
    weights = weights_by_prefix(model)
    prefix_of = {id(w): prefix for prefix, w in weights.items()}
    layout = {prefix: {"shape": list(w.shape), "group": w.group, "global_offset": w.global_offset, "modules": {}}
              for prefix, w in weights.items()}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (QLinear, QEmbedding)):
            kind = "linear" if isinstance(m, QLinear) else "embedding"
            layout[prefix_of[id(m.qweight)]]["modules"][name] = kind
            if isinstance(m, QLinear) and m.fused is not None:  # fused projections: this module's rows
                layout[prefix_of[id(m.qweight)]].setdefault("rows", {})[name] = list(m.rows)
    for prefix, entry in layout_entries(model, prefix_of).items():
        layout[prefix]["expert"] = entry
    return layout
