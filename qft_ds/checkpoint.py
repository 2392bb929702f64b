"""Checkpoints of our own format: safetensors for tensors, JSON for the rest, no pickle anywhere.

A checkpoint is a folder `OUTPUT_DIR/checkpoint-STEP/`:
- `model.safetensors`: the model's state dict (int8 codes, fp32 scales, outliers, EF residual, float
  params). A tied weight is stored once; its other names are listed in meta.json as aliases;
- `optimizer.safetensors`: QFTLion state (int8 momentum codes + scales, fp32 float-param momentum);
- `rng.safetensors`: torch RNG states (CPU, CUDA) of rank 0;
- `hf/`: the model's HF config and the tokenizer, so `qft_ds export` needs nothing else;
- `meta.json`: format version, step, data position, scheduler/engine/optimizer scalars, the DeepSpeed
  config, the int8 layout of every weight, and the sha256 of every file above.

Saves are atomic: everything is written to a hidden temporary folder, fsynced, and renamed into place;
then `OUTPUT_DIR/latest` (the folder's name) is replaced atomically. A save that fails midway leaves the
previous checkpoint and `latest` untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qft_ds import comm
from qft_ds.hub import sha256_file

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


def quant_layout(model: torch.nn.Module) -> dict:
    """For each HybridWeight: its state-dict prefix, the modules that read it, shape and group."""
    from qft_ds.nn.qmodules import QEmbedding, QLinear
    from qft_ds.quant.hybrid import HybridWeight
    layout, prefix_of = {}, {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, HybridWeight) and id(m) not in prefix_of:
            prefix_of[id(m)] = name
            layout[name] = {"shape": list(m.shape), "group": m.group, "global_offset": m.global_offset,
                            "modules": {}}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (QLinear, QEmbedding)):
            kind = "linear" if isinstance(m, QLinear) else "embedding"
            layout[prefix_of[id(m.qweight)]]["modules"][name] = kind
            if isinstance(m, QLinear) and m.fused is not None:  # fused projections: this module's rows
                layout[prefix_of[id(m.qweight)]].setdefault("rows", {})[name] = list(m.rows)
    return layout


def state_hash(model: torch.nn.Module, optimizer=None) -> str:
    """sha256 over every model tensor and optimizer state tensor, in a fixed order (bitwise equality)."""
    h = hashlib.sha256()
    tensors, _ = model_tensors(model)
    items = sorted(tensors.items())
    if optimizer is not None:
        items += sorted(_optimizer_tensors(optimizer.state_dict())[0].items())
    for name, t in items:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _optimizer_tensors(sd: dict):
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{key}"] = v.detach()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, scalars


# -- files -----------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict, path: Path) -> None:
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json(obj, what: str) -> str:
    try:
        return json.dumps(obj, indent=1, allow_nan=True)
    except TypeError as e:
        raise CheckpointError(f"cannot save {what} as JSON ({e}); qft_ds checkpoints hold no pickled objects")


# -- save ------------------------------------------------------------------------------------------
def save(out_dir, engine, optimizer, *, step: int, data: dict | None = None, ds_config: dict | None = None,
         tokenizer=None) -> Path:
    """Write `out_dir/checkpoint-STEP` atomically and point `out_dir/latest` at it. Rank 0 writes;
    every rank returns after the write (a barrier when distributed)."""
    if getattr(optimizer, "zero_stage", 0):  # ZeRO: every rank writes its own slices
        from qft_ds.zero.checkpoint import save as zero_save
        return zero_save(out_dir, engine, optimizer, step=step, data=data, ds_config=ds_config, tokenizer=tokenizer)
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step}"
    if comm.rank() == 0:
        _write(out_dir, final, engine, optimizer, step, data or {}, ds_config, tokenizer)
    comm.barrier()
    return final


def save_rng_and_hf(tmp: Path, model, tokenizer) -> None:
    """The torch RNG states and the HF config/generation config/tokenizer beside the tensors."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(rng, tmp / "rng.safetensors")
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
        "format": FORMAT, "format_version": FORMAT_VERSION, "qft_ds_version": _version(), "step": step,
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
        _fsync_file(p)
    meta["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
    (tmp / "meta.json").write_text(_json(meta, "checkpoint metadata"))
    _fsync_file(tmp / "meta.json")
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _write(out_dir, final, engine, optimizer, step, data, ds_config, tokenizer) -> None:
    model = engine.module if hasattr(engine, "module") else engine
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=out_dir))
    old = None
    try:
        tensors, aliases = model_tensors(model)
        _save_tensors(tensors, tmp / "model.safetensors")
        osd = optimizer.state_dict()
        opt_tensors, opt_scalars = _optimizer_tensors(osd)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        save_rng_and_hf(tmp, model, tokenizer)
        meta = base_meta(engine, model, step, data, aliases, osd, opt_scalars, ds_config)
        seal(tmp, meta)
        if final.exists():  # re-saving a step: move the old one aside until the new one is in place
            old = out_dir / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
        write_text_atomic(out_dir / LATEST, final.name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    import qft_ds
    return qft_ds.__version__


# -- load ------------------------------------------------------------------------------------------
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
                              f"({_version()}) reads version {FORMAT_VERSION}. Use the qft_ds version that wrote "
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
    from qft_ds.config import QFTConfig
    a, b = QFTConfig.from_dict(saved).__dict__, QFTConfig.from_dict(ds_config.get("qft")).__dict__
    diff = [k for k in QFTConfig.keys() if k not in _RESUMABLE_QFT_KEYS and a[k] != b[k]]
    if diff:
        raise CheckpointError("the config's qft section differs from the checkpoint's in " +
                              ", ".join(f"'qft.{k}' ({a[k]!r} saved, {b[k]!r} now)" for k in diff))


@torch.no_grad()
def load(path, engine, optimizer, *, ds_config: dict | None = None, verify: bool = True) -> dict:
    """Restore model, optimizer, scheduler, engine counters and RNG from a checkpoint (or a run folder's
    latest). Returns its meta (step, data position). Nothing is changed if a check fails."""
    ckpt = resolve(path)
    if getattr(optimizer, "zero_stage", 0) or "zero" in read_meta(ckpt, verify=False):
        from qft_ds.zero.checkpoint import load as zero_load  # sharded state, or a sharded checkpoint
        return zero_load(ckpt, engine, optimizer, ds_config=ds_config, verify=verify)
    meta = read_meta(ckpt, verify=verify)
    check_config(meta, ds_config)
    model = engine.module if hasattr(engine, "module") else engine
    tensors, aliases = model_tensors(model)
    device = next(iter(tensors.values())).device if tensors else "cpu"
    saved = read_tensors(ckpt / "model.safetensors", device)
    if set(saved) != set(tensors) or meta["aliases"] != aliases:
        missing, extra = sorted(set(tensors) - set(saved)), sorted(set(saved) - set(tensors))
        raise CheckpointError(f"{ckpt} does not fit this model ({type(model).__name__}, checkpoint has "
                              f"{meta.get('model_class')}): missing {missing[:5]}, unexpected {extra[:5]}")
    for name, t in tensors.items():
        if saved[name].shape != t.shape or saved[name].dtype != t.dtype:
            raise CheckpointError(f"{ckpt}: '{name}' is {saved[name].dtype}{list(saved[name].shape)} in the "
                                  f"checkpoint, {t.dtype}{list(t.shape)} in the model")
    osd = _optimizer_state(ckpt, meta, device)
    for name, t in tensors.items():  # all checks passed: now write
        t.copy_(saved[name])
    optimizer.load_state_dict(osd)
    restore_run_state(ckpt, meta, engine)
    return meta


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


def _optimizer_state(ckpt: Path, meta: dict, device) -> dict:
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
