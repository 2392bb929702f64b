"""Compact exports (`qft_ds export --int8`, `--lowbit`) read back: the JSON that describes each format, and
the model rebuilt from the export's config.json, its stored tensors copied in only once every check passed.
The formats' own parts are export.load_int8 (int8 QFT) and methods.peqa.load_peqa (low-bit PEQA)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qft_ds.checkpoint_io import CheckpointError, model_tensors, read_tensors


def read_export_info(path: Path, name: str, kind: str, fmt: str, version: int) -> dict:
    """The JSON that describes a compact export (`--int8`, `--lowbit`), checked for its format."""
    try:
        info = json.loads((path / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a {kind} export of qft_ds ({name}: {e})") from None
    if info.get("format") != fmt or info.get("format_version") != version:
        raise CheckpointError(f"{path}: {kind} export format {info.get('format')} v{info.get('format_version')}; "
                              f"this qft_ds reads {fmt} v{version}")
    return info


def model_from_config(path: Path, info: dict, compute_dtype: torch.dtype | None):
    """(the export's model with random weights, to convert and fill; its compute dtype: as trained unless
    given)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # only exports need transformers here
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if info["compute_bf16"] else torch.float32
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)), compute_dtype


@torch.no_grad()
def fill(model, path: Path, tensors_file: str, info: dict, check=None) -> None:
    """Copy the stored tensors into the converted model: same names, aliases and shapes (and whatever
    `check(name, tensor, stored)` raises on), all checked before anything is written."""
    have, aliases = model_tensors(model)
    saved = read_tensors(path / tensors_file)
    if set(have) != set(saved) or aliases != info["aliases"]:
        raise CheckpointError(f"{path}: stored tensors do not fit the model built from its config.json "
                              f"(missing {sorted(set(have) - set(saved))[:5]}, "
                              f"extra {sorted(set(saved) - set(have))[:5]})")
    for name, t in have.items():
        if t.shape != saved[name].shape:
            raise CheckpointError(f"{path}: '{name}' is {list(saved[name].shape)}, the model wants {list(t.shape)}")
        if check is not None:
            check(name, t, saved[name])
    for name, t in have.items():
        t.copy_(saved[name])
