"""PEQA (Kim et al., NeurIPS 2023): 3/4-bit RTN weights whose integer codes and zero points are frozen;
only the per-group fp32 scales train (AdamW by default), so the tuned model is still quantized.

Every nn.Linear except the output head becomes a LowBitLinear with a trainable scale; embeddings, the
head (usually tied to them), norms and biases are frozen as they are.

Export (`qft_ds export CKPT OUT --lowbit`): packed codes + zero points + scales in
`peqa.safetensors`, the rest in `peqa.json`; `load_peqa(OUT)` gives the quantized model back. A dense
export (`qft_ds export CKPT OUT`) dequantizes to a plain HF folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qft_ds import checkpoint_io, compact, hf_save
from qft_ds.checkpoint_io import CheckpointError
from qft_ds.nn.lowbit import LowBitLinear, convert_lowbit
from qft_ds.quant.lowbit import dequantize_asym, unpack_nibbles

FORMAT, VERSION = "qft_ds-peqa", 1
_SUFFIXES = ("packed", "zeros", "scale", "layout")


def convert_peqa(model: nn.Module, bits: int = 4, group_size: int = 128,
                 compute_dtype: torch.dtype = torch.float32) -> dict[str, LowBitLinear]:
    """Quantize in place; afterwards the scales are the model's only trainable parameters. `save_pretrained`
    then writes dense HF weights (qft_ds.hf_save)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    dense_dtype = next((m.weight.dtype for m in model.modules() if type(m) is nn.Linear and m is not head),
                       torch.float32)
    modules = convert_lowbit(model, bits=bits, group_size=group_size, trainable_scales=True,
                             compute_dtype=compute_dtype)
    hf_save.install(model, hf_dense, dense_dtype)
    return modules


def hf_dense(model: nn.Module, state_dict: dict, dtype: torch.dtype) -> dict:
    """save_pretrained's tensors (qft_ds.hf_save): the low-bit weights dequantized."""
    return dense_tensors(state_dict, dtype)


def _lowbit_prefixes(tensors: dict) -> list[str]:
    return sorted(k[: -len(".layout")] for k in tensors if k.endswith(".qweight.layout"))


def dense_tensors(tensors: dict, dtype: torch.dtype) -> dict:
    """A PEQA state dict -> HF weights: each low-bit weight dequantized to `{module}.weight`."""
    out, done = {}, set()
    for prefix in _lowbit_prefixes(tensors):
        rows, cols, _bits, group = tensors[f"{prefix}.layout"].tolist()
        codes = unpack_nibbles(tensors[f"{prefix}.packed"], rows * cols).view(rows, cols)
        w = dequantize_asym(codes, tensors[f"{prefix}.scale"], tensors[f"{prefix}.zeros"], group, dtype)
        out[f"{prefix.removesuffix('.qweight')}.weight"] = w
        done.update(f"{prefix}.{s}" for s in _SUFFIXES)
    for name, v in tensors.items():
        if name not in done:
            out[name] = v.to(dtype) if v.is_floating_point() else v
    return out


def write_lowbit(ckpt: Path, meta: dict, out: Path) -> None:
    """The compact export: the checkpoint's model tensors as they are, plus what load_peqa needs."""
    t = checkpoint_io.read_tensors(ckpt / "model.safetensors")
    if not _lowbit_prefixes(t):
        raise CheckpointError(f"{ckpt} holds no low-bit weights; it is not a PEQA checkpoint")
    save_file(t, str(out / "peqa.safetensors"), metadata={"format": "pt"})
    ds = meta.get("ds_config") or {}
    qft = ds.get("qft") or {}
    info = {"format": FORMAT, "format_version": VERSION, "bits": qft.get("bits", 4),
            "group_size": qft.get("group_size", 128), "aliases": meta["aliases"],
            "compute_bf16": bool((ds.get("bf16") or {}).get("enabled"))}
    (out / "peqa.json").write_text(json.dumps(info, indent=1))


def load_peqa(path, device="cpu", compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A model with LowBitLinear layers from a `--lowbit` export, bit-identical to the tuned one."""
    path = Path(path)
    info = compact.read_export_info(path, "peqa.json", "PEQA", FORMAT, VERSION)
    model, compute_dtype = compact.model_from_config(path, info, compute_dtype)
    convert_lowbit(model, bits=info["bits"], group_size=info["group_size"], trainable_scales=True,
                   compute_dtype=compute_dtype, quantize=False)

    def check(name, t, stored):
        if t.dtype != stored.dtype:
            raise CheckpointError(f"{path}: '{name}' is {stored.dtype}, the model wants {t.dtype}")
        if name.endswith(".layout") and not torch.equal(t, stored):  # rows, cols, bits, group
            raise CheckpointError(f"{path}: '{name}' is {stored.tolist()}, rebuilt {t.tolist()}")
    compact.fill(model, path, "peqa.safetensors", info, check)
    hf_save.install(model, hf_dense, torch.float32)
    return model.to(device).eval()
