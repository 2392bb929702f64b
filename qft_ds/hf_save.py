"""`save_pretrained` of a converted model writes a real Hugging Face checkpoint: dense weights.

A converted model's `state_dict()` holds qft_ds's own tensors (`*.qweight.codes`, `.scales`, `.outlier_idx`,
`.outlier_val`, `.anchor`): DeepSpeed's and qft_ds's checkpoints need them to resume. Written by
transformers' `save_pretrained`, they would make a folder that `from_pretrained` loads with every weight
MISSING and re-initialised: a random model. So conversion gives the model its own `save_pretrained`
(`install`): it turns the state dict it is handed (or the model's) into dense `{module}.weight` tensors,
as `qft_ds export` does, then calls transformers' own. That covers `model.save_pretrained(...)`, HF
Trainer's and TRL's `save_model()` (under DeepSpeed they pass `state_dict=` from the engine) and
`accelerator.unwrap_model(model).save_pretrained(..., state_dict=accelerator.get_state_dict(model))`.

The dense dtype is the one the weights had before conversion (an fp32 model saves fp32, a bf16 one bf16,
as transformers would); `save_pretrained(..., qft_dtype=torch.bfloat16)` picks another. `state_dict()`
itself is unchanged.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from torch import nn

from qft_ds.nn import experts
from qft_ds.nn.layout import quant_layout
from qft_ds.ops import reference as ref
from qft_ds.quant.hybrid import HybridWeight

_QKEYS = ("codes", "scales", "outlier_idx", "outlier_val", "residual", "anchor")


class DenseSaveError(RuntimeError):
    """The model's state cannot be written as a dense HF checkpoint here (and is not written at all)."""


def install(model: nn.Module, to_dense, dtype: torch.dtype) -> None:
    """Give `model` a `save_pretrained` that writes `to_dense(model, state_dict, dtype)`. A no-op for a model
    without transformers' save_pretrained. A partial, not a bound method: it survives deepcopy (TRL's
    reference models) and pickling."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return
    model.save_pretrained = functools.partial(save_pretrained, model, to_dense, dtype)


def save_pretrained(model, to_dense, dtype, save_directory, is_main_process=True, state_dict=None, *args,
                    qft_dtype=None, **kwargs):
    dtype = qft_dtype or dtype
    dense = to_dense(model, model.state_dict() if state_dict is None else state_dict, dtype)
    out = type(model).save_pretrained(model, save_directory, is_main_process, dense, *args, **kwargs)
    # transformers records model.dtype, the first float Parameter's (an fp32 norm or anchor): say what was written
    name = str(dtype).removeprefix("torch.")
    model.config.dtype = name
    config = Path(save_directory) / "config.json"
    if is_main_process and config.is_file():
        data = json.loads(config.read_text())
        data.pop("torch_dtype", None)
        data["dtype"] = name
        tmp = config.with_name(f".config.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config)
    return out


def qft_dense(model: nn.Module, state_dict: dict, dtype: torch.dtype) -> dict:
    """A QFT model's state dict -> HF tensors: each HybridWeight dequantized (groups x scales, outliers put
    back) to `{module}.weight` for every module that reads it (rows of fused projections; one tensor for tied
    modules, which transformers then stores once). Other tensors (norms, biases) are cast to `dtype`. Weights
    absent from `state_dict` stay absent; one that is not whole (a ZeRO-3 shard) is an error."""
    layout = quant_layout(model)
    internal = set()  # every name a HybridWeight's tensors have in the state dict (tied, fused: several)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, HybridWeight):
            internal.update(f"{name}.{k}" for k in _QKEYS)
    if not internal.intersection(state_dict):
        return state_dict  # already dense (or a subset without quantized weights)
    out, expert_slices = {}, []
    for prefix, lay in layout.items():
        bases = [f"{mod}.qweight" for mod in lay["modules"]] or [prefix]  # an expert slice has no reader module
        names = {k: next((f"{b}.{k}" for b in bases if f"{b}.{k}" in state_dict), None)
                 for k in ("codes", "scales", "outlier_idx", "outlier_val")}
        if names["codes"] is None:
            continue
        codes = state_dict[names["codes"]]
        rows, cols = lay["shape"]
        if codes.numel() != rows * cols or any(v is None for v in names.values()):
            raise DenseSaveError(
                f"'{prefix}' is not whole in this state dict ({codes.numel()} of {rows * cols} codes: a ZeRO-3 "
                "shard?). Save a qft_ds checkpoint (qft_ds.checkpoint.save) and write the HF folder with "
                "`qft_ds export CHECKPOINT OUT_DIR`")
        w = ref.dequantize_hybrid(codes, state_dict[names["scales"]].float(), lay["group"],
                                  state_dict[names["outlier_idx"]].long(), state_dict[names["outlier_val"]])
        w = w.view(rows, cols).to(device="cpu", dtype=dtype)
        if "expert" in lay:  # one expert's slice of a 3-D Parameter: stacked below
            expert_slices.append((lay["expert"], w))
        for mod in lay["modules"]:
            r = lay.get("rows", {}).get(mod)
            out[f"{mod}.weight"] = w if r is None else w[r[0]:r[1]].clone()  # tied: one tensor, stored once
    out.update(experts.stack(expert_slices))
    for name, v in state_dict.items():
        if name in internal:
            continue
        out[name] = v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
    return out
