"""`qft_ds export`: a checkpoint -> a Hugging Face folder.

- default: every int8 weight dequantized (groups x scales, outliers put back) to bf16 (or fp16/fp32),
  written as sharded safetensors with the model's config.json and tokenizer. Plain
  `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it; qft_ds is not needed.
- `int8=True`: the compact form (codes + scales + outliers + float params in `qft_int8.safetensors`,
  the layout in `qft_int8.json`), loaded back into QLinear/QEmbedding modules by `load_int8`.
- a QST checkpoint: qft_ds's QST format (qft_ds.methods.qst_export: no dense HF model holds a side
  network), read back by `qft_ds.methods.load_qst`; plain transformers refuses it by its model type.

The folder and its files get the ordinary modes of the user's umask (like `cp`), not the private 0700/0600
that mkdtemp and safetensors use: an export is made to be shared.

The error-feedback residual (rounding "ef") is sub-grid state for training and is not exported.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from qft_ds import checkpoint_io, compact
from qft_ds.checkpoint_io import CheckpointError
from qft_ds.methods import peqa, qst_export
from qft_ds.nn import experts
from qft_ds.nn.convert import convert_model
from qft_ds.nn.layout import quant_layout
from qft_ds.ops import reference as ref
from qft_ds.zero.consolidate import consolidate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
INT8_FORMAT, INT8_VERSION = "qft_ds-int8", 1
_QKEYS = ("codes", "scales", "outlier_idx", "outlier_val", "residual")


def dequantize(t: dict, prefix: str, layout: dict) -> torch.Tensor:
    """fp32 dense weight of one HybridWeight from its stored tensors (the same maths as HybridWeight)."""
    return ref.dequantize_hybrid(t[f"{prefix}.codes"], t[f"{prefix}.scales"], layout["group"],
                                 t[f"{prefix}.outlier_idx"].long(), t[f"{prefix}.outlier_val"]).view(layout["shape"])


def _dense_tensors(ckpt: Path, meta: dict, dtype: torch.dtype, tied: bool) -> dict:
    t = checkpoint_io.read_tensors(ckpt / "model.safetensors")
    out, expert_slices = {}, []
    for prefix, layout in meta["quant"].items():
        w = dequantize(t, prefix, layout).to(dtype)
        if "expert" in layout:  # one expert's slice of a 3-D Parameter: stacked below
            expert_slices.append((layout["expert"], w))
        rows = layout.get("rows")
        for i, module in enumerate(layout["modules"]):
            if rows is not None:  # fused projections: each module's rows of the stacked weight
                a, b = rows[module]
                out[f"{module}.weight"] = w[a:b].clone()
                continue
            if i and tied:  # a tied head: config.tie_word_embeddings re-ties it on load
                continue
            out[f"{module}.weight"] = w if i == 0 else w.clone()
        for k in _QKEYS:
            t.pop(f"{prefix}.{k}", None)
    out.update(experts.stack(expert_slices))
    for name, v in t.items():  # norms, biases: fp32 in training, the export dtype here
        out[name] = v.to(dtype) if v.is_floating_point() else v
    return out


def _save_sharded(tensors: dict, out: Path, max_shard_bytes: int) -> None:
    shards, cur, size = [], {}, 0
    for name, v in tensors.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = v.contiguous()
        size += n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def export(ckpt, out_dir, dtype: str = "bf16", int8: bool = False, max_shard_gb: float = 5.0,
           lowbit: bool = False) -> Path:
    """Write an HF folder at out_dir (atomically; refuses a non-empty out_dir). Returns out_dir.

    `lowbit`: a PEQA checkpoint's compact form (packed codes + zero points + scales; qft_ds.methods.load_peqa).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = checkpoint_io.resolve(ckpt)
    meta = checkpoint_io.read_meta(ckpt)
    if "zero" in meta:  # sharded by ZeRO: consolidate one weight at a time into a plain checkpoint first
        parent = Path(out_dir).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".qft-consolidate-", dir=parent) as tmp:
            plain = consolidate(ckpt, Path(tmp) / "plain")
            return export(plain, out_dir, dtype, int8, max_shard_gb, lowbit)
    method = ((meta.get("ds_config") or {}).get("qft") or {}).get("method", "qft")
    _check_method_flags(ckpt, method, int8, lowbit)
    hf = ckpt / "hf"
    if not (hf / "config.json").is_file():
        raise CheckpointError(f"{ckpt} has no hf/config.json (the model was not a transformers model); "
                              "it cannot be exported as an HF folder")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose a new OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        config = json.loads((hf / "config.json").read_text())
        for f in hf.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)  # not copy2: the checkpoint's modes are not the export's
        if method == "qst":
            config = qst_export.write_checkpoint(ckpt, meta, config, tmp)
        elif lowbit:
            peqa.write_lowbit(ckpt, meta, tmp)
        elif int8:
            _write_int8(ckpt, meta, tmp)
        elif method == "peqa":
            tensors = peqa.dense_tensors(checkpoint_io.read_tensors(ckpt / "model.safetensors"), DTYPES[dtype])
        else:
            tensors = _dense_tensors(ckpt, meta, DTYPES[dtype], bool(config.get("tie_word_embeddings")))
        if not (lowbit or int8 or method == "qst"):
            _save_sharded(tensors, tmp, int(max_shard_gb * 2**30))
            config.pop("torch_dtype", None)
            config["dtype"] = DTYPE_NAMES[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _share(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _share(folder: Path) -> None:
    """The modes a plain `cp` would give: mkdtemp made the folder 0700, and safetensors writes files 0600."""
    umask = checkpoint_io._umask()  # checkpoints get the same modes (checkpoint_io)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _check_method_flags(ckpt: Path, method: str, int8: bool, lowbit: bool) -> None:
    if method == "qst" and (int8 or lowbit):
        raise CheckpointError(f"{ckpt} is a QST checkpoint: its export is always qft_ds's QST format (the low-bit "
                              "backbone as trained, plus the side network); drop --int8/--lowbit")
    if int8 and method != "qft":
        raise CheckpointError(f"--int8 is the compact form of a QFT checkpoint; {ckpt} is {method}: use --lowbit")
    if lowbit and method != "peqa":
        raise CheckpointError(f"--lowbit is the compact form of a PEQA checkpoint; {ckpt} is {method}: use --int8")


def _write_int8(ckpt: Path, meta: dict, tmp: Path) -> None:
    t = checkpoint_io.read_tensors(ckpt / "model.safetensors")
    t = {k: v for k, v in t.items() if not k.endswith(".residual")}
    save_file(t, str(tmp / "qft_int8.safetensors"), metadata={"format": "pt"})
    qft = (meta.get("ds_config") or {}).get("qft") or {}
    info = {"format": INT8_FORMAT, "format_version": INT8_VERSION, "quant": meta["quant"], "aliases": meta["aliases"],
            "group_size": qft.get("group_size", 128), "outlier_frac": qft.get("outlier_frac", 0.01),
            "fuse_projections": bool(meta.get("fuse_projections", False)),
            "compute_bf16": bool(((meta.get("ds_config") or {}).get("bf16") or {}).get("enabled"))}
    (tmp / "qft_int8.json").write_text(json.dumps(info, indent=1))


def load_int8(path, device="cpu", compute_dtype: torch.dtype | None = None):
    """A model with QLinear/QEmbedding modules from an `--int8` export (inference, or more QFT training)."""
    path = Path(path)
    info = compact.read_export_info(path, "qft_int8.json", "int8", INT8_FORMAT, INT8_VERSION)
    model, compute_dtype = compact.model_from_config(path, info, compute_dtype)
    convert_model(model, group_size=info["group_size"], outlier_frac=info["outlier_frac"], compute_dtype=compute_dtype,
                  fuse_projections=info.get("fuse_projections", False))
    layout = quant_layout(model)
    if layout.keys() != info["quant"].keys():
        raise CheckpointError(f"{path}: stored weights do not fit the model built from its config.json (missing "
                              f"{sorted(layout.keys() - info['quant'].keys())[:5]}, "
                              f"extra {sorted(info['quant'].keys() - layout.keys())[:5]})")
    for prefix, lay in layout.items():
        if lay["group"] != info["quant"][prefix]["group"]:
            raise CheckpointError(f"{path}: '{prefix}' has group {info['quant'][prefix]['group']}, rebuilt {lay['group']}")
    compact.fill(model, path, "qft_int8.safetensors", info)
    return model.to(device).eval()
