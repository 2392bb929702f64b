"""QST's saved form: `QSTModel.save_pretrained(DIR)` and `qft_ds export CKPT DIR` of a QST run; `load_qst(DIR)`.

A QST model cannot be folded into a dense Hugging Face model: its side network reads every layer's hidden
state and adds a second residual stream before the head (qft_ds.methods.qst). So the folder holds:
- `qst.safetensors`: every tensor of the QSTModel as trained (the backbone's packed low-bit codes, zero
  points and scales, its frozen embeddings and norms, and the side network), nothing dequantized;
- `qst.json`: the format, the backbone's HF config, the side network's settings, tied-tensor aliases;
- `config.json` with `"model_type": "qft_ds_qst"`: plain transformers (`AutoModelForCausalLM.from_pretrained`,
  `AutoConfig`) raises "model type `qft_ds_qst` ... does not recognize this architecture", never loading
  random weights; the tokenizer files beside it load as usual.
`load_qst(DIR)` rebuilds the QSTModel with bit-identical logits, and it generates like an HF model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qft_ds import checkpoint_io, compact
from qft_ds.checkpoint_io import CheckpointError
from qft_ds.config import QFTConfig
from qft_ds.nn.precision import autocast_forward

FORMAT, VERSION = "qft_ds-qst", 1
MODEL_TYPE = "qft_ds_qst"  # unknown to transformers: its loaders refuse the folder
SETTINGS = ("r", "downsample", "adapter_rank", "bits", "group_size")


def refusing_config(backbone_type: str) -> dict:
    """config.json of a QST folder: enough for transformers to refuse it by name, and for a reader to see why."""
    return {"model_type": MODEL_TYPE, "architectures": ["QSTModel"], "qft_ds_format": FORMAT,
            "backbone_model_type": backbone_type,
            "note": "a qft_ds QST model (frozen low-bit backbone + side network): load it with "
                    "qft_ds.methods.load_qst(PATH); plain transformers cannot represent it"}


def write(out: Path, tensors: dict, aliases: dict, backbone_config: dict, settings: dict, compute_bf16: bool) -> dict:
    """qst.safetensors and qst.json into `out`; returns the config.json to write beside them."""
    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"QST settings lack {', '.join(missing)}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "qst.safetensors"),
              metadata={"format": "pt"})
    info = {"format": FORMAT, "format_version": VERSION, "backbone_config": backbone_config,
            "settings": {k: settings[k] for k in SETTINGS}, "aliases": aliases, "compute_bf16": bool(compute_bf16)}
    (out / "qst.json").write_text(json.dumps(info, indent=1))
    return refusing_config(backbone_config.get("model_type", "?"))


def write_checkpoint(ckpt: Path, meta: dict, backbone_config: dict, out: Path) -> dict:
    """`qft_ds export` of a QST checkpoint (its hf/config.json is the backbone's config)."""
    ds = meta.get("ds_config") or {}
    cfg = QFTConfig.from_dict(ds.get("qft") or {})
    tensors = checkpoint_io.read_tensors(ckpt / "model.safetensors")
    if "alpha" not in tensors:
        raise CheckpointError(f"{ckpt}: no side network ('alpha' missing); it is not a QST checkpoint")
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    return write(out, tensors, meta["aliases"], backbone_config, settings, bool((ds.get("bf16") or {}).get("enabled")))


def save_model(model, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
               safe_serialization: bool = True, **unsupported) -> None:
    """`QSTModel.save_pretrained`: the live model (or the full `state_dict` handed in, as accelerate and
    DeepSpeed engines do) in the QST format. Config and tokenizer-free, like transformers'."""
    if unsupported or not safe_serialization:
        bad = sorted(unsupported) + ([] if safe_serialization else ["safe_serialization=False"])
        raise TypeError(f"QSTModel.save_pretrained writes safetensors in qft_ds's QST format; it does not take "
                        f"{', '.join(bad)}")
    if not is_main_process:
        return
    tensors, aliases = checkpoint_io.model_tensors(model)
    if state_dict is not None:
        given = {k: v for k, v in state_dict.items() if k not in aliases}
        if given.keys() != tensors.keys():
            raise ValueError(f"state_dict does not fit this QSTModel (missing {sorted(tensors.keys() - given.keys())[:5]}"
                             f", extra {sorted(given.keys() - tensors.keys())[:5]})")
        tensors = given
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    compute_bf16 = getattr(model.forward, "_qft_autocast", None) == torch.bfloat16
    config = write(out, tensors, aliases, model.backbone.config.to_dict(), model.qst_settings, compute_bf16)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_qst(path, device="cpu", compute_dtype: torch.dtype | None = None):
    """The QSTModel of a QST folder (save_pretrained or `qft_ds export`), bit-identical to the trained one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qft_ds.methods.qst import build_qst
    path = Path(path)
    info = compact.read_export_info(path, "qst.json", "QST", FORMAT, VERSION)
    backbone_cfg = dict(info["backbone_config"])
    bf16 = info["compute_bf16"] if compute_dtype is None else compute_dtype == torch.bfloat16
    config = AutoConfig.for_model(backbone_cfg.pop("model_type"), **backbone_cfg)
    qst = build_qst(AutoModelForCausalLM.from_config(config), **info["settings"], quantize=False,
                    compute_dtype=torch.bfloat16 if bf16 else torch.float32)

    def check(name, t, stored):
        if t.dtype != stored.dtype:
            raise CheckpointError(f"{path}: '{name}' is {stored.dtype}, the model wants {t.dtype}")
    compact.fill(qst, path, "qst.safetensors", info, check)
    if bf16:  # as trained (qft_ds.methods.setup.prepare_model)
        autocast_forward(qst, torch.bfloat16)
    return qst.to(device).eval()
