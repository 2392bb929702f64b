"""The files of a qft_ds checkpoint folder (plain and ZeRO): atomic writes, hashes, metadata, reading back.

Writers (checkpoint.py, zero/checkpoint.py) fill a hidden temporary folder, `seal` it (every file hashed
into meta.json, everything fsynced), then `publish` it: renamed into place, and `latest` replaced
atomically. A save that fails midway leaves the previous checkpoint and `latest` untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qft_ds.config import QFTConfig
from qft_ds.hub import sha256_file
from qft_ds.nn.layout import quant_layout
from qft_ds.version import __version__

FORMAT = "qft_ds-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
PREFIX = "checkpoint-"
# qft keys that may change across a resume: they do not change the int8 state or its RNG stream.
_RESUMABLE_QFT_KEYS = ("backend", "gradient_checkpointing", "flow", "reuse_recomputed_weight")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another format version, or does not fit the model."""


# -- tensors ---------------------------------------------------------------------------------------
def model_tensors(model: torch.nn.Module):
    """(tensors by first name, aliases {other name: first name}); empty anchors are left out."""
    tensors, aliases, first = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith(".anchor") and t.numel() == 0:
            continue  # HybridWeight anchors hold no data: they only key the optimizer state
        if id(t) in first:  # a tied weight: the same tensor object under a second name
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[name] = t.detach()
    return tensors, aliases


def state_hash(model: torch.nn.Module, optimizer=None) -> str:
    """sha256 over every model tensor and optimizer state tensor, in a fixed order (bitwise equality)."""
    h = hashlib.sha256()
    tensors, _ = model_tensors(model)
    items = sorted(tensors.items())
    if optimizer is not None:
        items += sorted(optimizer_tensors(optimizer.state_dict())[0].items())
    for name, t in items:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(sd: dict):
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{key}"] = v.detach()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, scalars


# -- files -----------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict, path: Path) -> None:
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def to_json(obj, what: str) -> str:
    try:
        return json.dumps(obj, indent=1, allow_nan=True)
    except TypeError as e:
        raise CheckpointError(f"cannot save {what} as JSON ({e}); qft_ds checkpoints hold no pickled objects")


def save_rng_and_hf(tmp: Path, model, tokenizer) -> None:
    """The torch RNG states and the HF config/generation config/tokenizer beside the tensors."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(rng, tmp / "rng.safetensors")
    if hasattr(model, "config") and hasattr(model.config, "to_json_file"):
        (tmp / "hf").mkdir()
        model.config.to_json_file(str(tmp / "hf" / "config.json"))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(str(tmp / "hf" / "generation_config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "hf"))


def base_meta(engine, model, step, data, aliases, osd, opt_scalars, ds_config) -> dict:
    sched = getattr(engine, "lr_scheduler", None)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "qft_ds_version": __version__, "step": step,
        "data": data, "model_class": type(model).__name__, "aliases": aliases, "quant": quant_layout(model),
        "fuse_projections": bool(getattr(model, "_qft_fuse_projections", False)),
        "engine": {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "skipped_steps",
                                                             "micro_steps")},
        "scheduler": sched.state_dict() if sched is not None else None,
        "optimizer": {"param_groups": osd["param_groups"], "qft": osd.get("qft"), "scalars": opt_scalars},
        "ds_config": ds_config,
    }


def seal(tmp: Path, meta: dict) -> None:
    """Hash every file into meta.json, then fsync files, meta.json and folders: ready to rename."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        fsync_file(p)
    meta["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
    (tmp / "meta.json").write_text(to_json(meta, "checkpoint metadata"))
    fsync_file(tmp / "meta.json")
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def publish(tmp: Path, final: Path) -> None:
    """Rename the sealed folder `tmp` to `final` and point `latest` beside it at it. A `final` saved before
    (the same step again) is moved aside until the new one is in place, and put back if the rename fails."""
    out_dir, old = final.parent, None
    if final.exists():
        old = out_dir / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    fsync_dir(out_dir)
    write_text_atomic(out_dir / LATEST, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- read ------------------------------------------------------------------------------------------
def resolve(path) -> Path:
    """A checkpoint folder, or a run folder whose `latest` names one -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: no such file or folder")
    if (path / "meta.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / "meta.json").is_file():
            raise CheckpointError(f"{latest} names '{target.name}', but {target} is missing or has no meta.json")
        return target
    found = sorted(p.name for p in path.glob(f"{PREFIX}*") if (p / "meta.json").is_file())
    raise CheckpointError(f"{path} is not a checkpoint (no meta.json) and has no '{LATEST}' file"
                          + (f"; it holds {', '.join(found)}: pass one of them directly" if found else ""))


def read_meta(ckpt, verify: bool = True) -> dict:
    """meta.json of a checkpoint folder, checked for format, version and (if verify) file hashes."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json is unreadable or corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a qft_ds checkpoint (meta.json has no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint format version {meta.get('format_version')}; this qft_ds "
                              f"({__version__}) reads version {FORMAT_VERSION}. Use the qft_ds version that wrote "
                              f"it ({meta.get('qft_ds_version')}) to export it, or start a new run.")
    if verify:
        for rel, digest in meta["files"].items():
            p = ckpt / rel
            if not p.is_file():
                raise CheckpointError(f"{ckpt} is incomplete: {rel} is missing")
            if sha256_file(p) != digest:
                raise CheckpointError(f"{ckpt} is corrupt: {rel} does not match its sha256 in meta.json")
    return meta


def read_tensors(path: Path, device="cpu") -> dict:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def check_config(meta: dict, ds_config: dict | None) -> None:
    """The qft section must match the checkpoint's except keys that leave the int8 state alone."""
    saved = (meta.get("ds_config") or {}).get("qft")
    if ds_config is None or saved is None:
        return
    if saved.get("method", "qft") == "qft":  # what the model was converted with (older checkpoints: never fused)
        saved = {**saved, "fuse_projections": bool(meta.get("fuse_projections", False))}
    a, b = QFTConfig.from_dict(saved).__dict__, QFTConfig.from_dict(ds_config.get("qft")).__dict__
    diff = [k for k in QFTConfig.keys() if k not in _RESUMABLE_QFT_KEYS and a[k] != b[k]]
    if diff:
        raise CheckpointError("the config's qft section differs from the checkpoint's in " +
                              ", ".join(f"'qft.{k}' ({a[k]!r} saved, {b[k]!r} now)" for k in diff))


def restore_run_state(ckpt: Path, meta: dict, engine) -> None:
    """The LR scheduler, the engine's counters and the torch RNG, as saved (plain and ZeRO loads)."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and meta["scheduler"] is not None:
        sched.load_state_dict(meta["scheduler"])
    for key, value in meta["engine"].items():
        if hasattr(engine, key):
            setattr(engine, key, value)
    rng = read_tensors(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())
                                      if f"cuda.{i}" in rng])


def optimizer_state(ckpt: Path, meta: dict, device) -> dict:
    tensors = read_tensors(ckpt / "optimizer.safetensors", device)
    state: dict = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, v in meta["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in meta["optimizer"]["param_groups"]]
    sd = {"state": state, "param_groups": groups}
    if meta["optimizer"].get("qft") is not None:
        sd["qft"] = meta["optimizer"]["qft"]
    return sd
