"""What conversion left in fp32, said at start-up; which parameters get weight decay; the state line.

Conversion quantizes nn.Linear, nn.Embedding, transformers' Conv1D, the subclasses it can reproduce
(qft_ds.nn.adapters) and transformers' MoE experts, per expert slice (qft_ds.nn.experts). Every other weight
matrix stays an fp32 Parameter, trained by fp32 Lion with an fp32 momentum (8 bytes per parameter instead of
~2): MoE routers (kept exact: top-k routing is discontinuous), experts of other shapes, OPT's learned
positions, convolutions. `fp32_matrices` lists each with its reason and
bytes, and conversion logs that list as a warning, so that nothing is left in fp32 silently.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from qft_ds.quant.hybrid import HybridWeight

logger = logging.getLogger("qft_ds")

LISTED = 40  # lines of the start-up warning before the rest is summed up per reason


def decays(param: torch.Tensor, name: str = "") -> bool:
    """Whether `param` gets weight decay: quantized weights and every other weight matrix (2-D or more,
    also when it stays fp32) do; norms, biases and other 1-D or scalar parameters do not. `name`
    (its state-dict name) also exempts a matrix named as a bias (GPT-OSS's experts' [E, out] biases) or held
    by a norm; conversion tags such parameters (`mark_no_decay`), so that callers without names agree."""
    if getattr(param, "_qft_weight", None) is not None:
        return True
    if getattr(param, "_qft_no_decay", False):  # tagged by conversion, which knows the names
        return False
    if name:
        module, _, leaf = name.rpartition(".")
        if "bias" in leaf or "norm" in module.rsplit(".", 1)[-1].lower():
            return False
    return param.dim() >= 2


def mark_no_decay(model: nn.Module) -> None:
    """Tag the matrices that `decays` exempts by their name, for callers that see parameters without names."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not decays(p, name):
            p._qft_no_decay = True


def _reason(module: nn.Module, module_name: str, pname: str, p: torch.Tensor) -> str:
    kind = type(module).__name__
    if p.dim() >= 3 and "expert" in f"{kind}.{pname}".lower():
        return (f"MoE experts stored as one {p.dim()}-D Parameter in {kind}, not a transformers experts module "
                "(use_experts_implementation) that qft_ds.nn.experts converts")
    leaf = module_name.rsplit(".", 1)[-1].lower()
    if "router" in kind.lower() or leaf in ("gate", "router"):
        return f"a MoE router ({kind}): read by its own forward, kept exact"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"a convolution ({kind})"
    return f"read by {kind}.forward, not a linear or embedding layer qft_ds can replace"


def fp32_matrices(model: nn.Module) -> list[dict]:
    """Every weight matrix that is not quantized (2 or more dimensions, not a bias or a norm: what `decays`),
    as {"name", "shape", "params", "bytes", "reason"}: bytes of the weight itself (fp32 Lion keeps as much again
    in momentum). Reasons recorded by conversion (a layer it would not replace, and why) come first;
    otherwise the holder's type says it."""
    kept = getattr(model, "_qft_kept", {})
    out, seen = [], set()
    for mod_name, m in model.named_modules():
        if isinstance(m, HybridWeight):
            continue
        for pname, p in m.named_parameters(recurse=False):
            name = f"{mod_name}.{pname}" if mod_name else pname
            if p.dim() < 2 or id(p) in seen or getattr(p, "_qft_weight", None) is not None or not decays(p, name):
                continue
            seen.add(id(p))
            out.append({"name": name, "shape": list(p.shape), "params": p.numel(),
                        "bytes": p.numel() * p.element_size(),
                        "reason": kept.get(mod_name) or _reason(m, mod_name, pname, p)})
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fp32_report(model: nn.Module, entries: list[dict] | None = None) -> str:
    """The start-up warning: each fp32 weight matrix with its shape, bytes and reason ('' if none)."""
    entries = fp32_matrices(model) if entries is None else entries
    if not entries:
        return ""
    n = sum(e["params"] for e in entries)
    quantized = sum(w.numel for w in {id(w): w for w in model.modules() if isinstance(w, HybridWeight)}.values())
    others = sum(p.numel() for p in model.parameters() if getattr(p, "_qft_weight", None) is None)
    total = max(quantized + others, 1)
    nbytes = sum(e["bytes"] for e in entries)
    lines = [f"qft_ds: {len(entries)} weight matri{'x stays' if len(entries) == 1 else 'ces stay'} fp32, not int8: "
             f"{_mb(nbytes)} (+ as much fp32 Lion momentum), {100 * n / total:.1f}% of the model's parameters:"]
    for e in entries[:LISTED]:
        lines.append(f"  {e['name']} {e['shape']} {_mb(e['bytes'])}: {e['reason']}")
    rest = entries[LISTED:]
    if rest:
        by_reason: dict[str, list] = {}
        for e in rest:
            by_reason.setdefault(e["reason"], []).append(e)
        for reason, es in by_reason.items():
            lines.append(f"  ... {len(es)} more, {_mb(sum(e['bytes'] for e in es))}: {reason}")
    return "\n".join(lines)


def state_line(state: dict) -> str:
    """The state part of train.py's start-up line from QFTLion.state_nbytes(): bytes per quantized parameter,
    and over every trained parameter (fp32 ones count with their fp32 momentum)."""
    q, f = state["quantized_params"], state.get("float_params", 0)
    total = state["quantized_bytes"] + state.get("float_bytes", 0)
    return (f"state: {state['bytes_per_quantized_param']:.3f} bytes/quantized param, "
            f"{total / max(q + f, 1):.3f} bytes/param over all {q + f:,} ({f:,} in fp32)")
