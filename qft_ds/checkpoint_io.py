"""The files of a qft_ds checkpoint folder (plain and ZeRO): atomic writes, hashes, metadata, reading back.

Writers (checkpoint.py, zero/checkpoint.py) take the run folder's lock (run_folder.py), fill a hidden
temporary folder, `seal` it (every file hashed into meta.json, meta.json hashed into meta.sha256, everything
fsynced), then `publish` it: renamed into place, and `latest` replaced atomically. A save that fails
midway leaves the previous checkpoint and `latest` untouched; what a killed one leaves is tidied or
recovered under the lock by the next save or start (run_folder.tidy).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qft_ds import checkpoint_meta, run_folder
from qft_ds.hub import sha256_file
from qft_ds.nn.layout import quant_layout
from qft_ds.resume_rules import config_changes
from qft_ds.run_folder import LATEST, PREFIX, CheckpointError  # noqa: F401  (re-exported)
from qft_ds.version import __version__

FORMAT = "qft_ds-checkpoint"
FORMAT_VERSION = 2  # 2: meta.json is itself hashed, into meta.sha256 (1 had no such file)

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


def _umask() -> int:
    mask = os.umask(0)  # the only portable read of the umask is to set it: put it straight back
    os.umask(mask)
    return mask


def save_tensors(tensors: dict, path: Path) -> None:
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600 files: give them the mode any file gets here


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
    checkpoint_meta.write_manifest_hash(tmp)
    fsync_file(tmp / "meta.json")
    fsync_file(tmp / checkpoint_meta.MANIFEST_HASH)
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def temp_folder(final: Path, tag) -> Path:
    """The temporary folder of a save of `final`, named so that run_folder.tidy knows it as ours."""
    return final.parent / f".tmp-{final.name}-{tag}"


def publish(tmp: Path, final: Path) -> None:
    """Rename the sealed folder `tmp` to `final` and point `latest` beside it at it. A `final` saved before
    (the same step again) is moved aside until the new one is in place, and put back if the rename fails;
    if the process dies in between, run_folder.tidy puts it back at the next save or start."""
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
    if not path.exists() and run_folder.CHECKPOINT_NAME.match(path.name) and path.parent.is_dir() and \
            run_folder.leftovers(path.parent):
        with run_folder.locked(path.parent):  # a killed re-save may have moved it aside: put it back
            pass
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: no such file or folder")
    if (path / "meta.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = run_folder.read_latest(path)
        if not (target / "meta.json").is_file():
            raise CheckpointError(f"{latest} names '{target.name}', but {target} is missing or has no meta.json")
        return target
    found = sorted(p.name for p in path.glob(f"{PREFIX}*") if (p / "meta.json").is_file())
    raise CheckpointError(f"{path} is not a checkpoint (no meta.json) and has no '{LATEST}' file"
                          + (f"; it holds {', '.join(found)}: pass one of them directly" if found else ""))


def parse_meta(ckpt: Path) -> dict:
    """meta.json as JSON, unchecked (read_meta checks it)."""
    try:
        return json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json is unreadable or corrupt ({e})") from None


def read_meta(ckpt, verify: bool = True) -> dict:
    """meta.json of a checkpoint folder, checked for format, version and (if verify) file hashes."""
    ckpt = Path(ckpt)
    meta = parse_meta(ckpt)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a qft_ds checkpoint (meta.json has no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") == 1:  # same tensors and fields; only meta.sha256 is new
        raise CheckpointError(f"{ckpt} has checkpoint format version 1, written before checkpoints hashed their own "
                              "meta.json; this qft_ds reads version 2. If you trust it, set \"format_version\": 2 "
                              "in its meta.json, then run `sha256sum meta.json > meta.sha256` in that folder")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint format version {meta.get('format_version')}; this qft_ds "
                              f"({__version__}) reads version {FORMAT_VERSION}. Use the qft_ds version that wrote "
                              f"it ({meta.get('qft_ds_version')}) to export it, or start a new run.")
    if verify:
        problem = checkpoint_meta.verify_manifest_hash(ckpt)
        if problem:
            raise CheckpointError(f"{ckpt} is corrupt: {problem}")
    try:
        checkpoint_meta.check_meta(meta, "meta.json")
    except checkpoint_meta.MetaError as e:
        raise CheckpointError(f"{ckpt} is corrupt: {e}") from None
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
    """This run's config may differ from the checkpoint's only as resume_rules allows (each refusal named)."""
    saved = meta.get("ds_config")
    if ds_config is None or saved is None:
        return
    # older checkpoints: never fused
    changes = config_changes(saved, ds_config, fuse_projections=bool(meta.get("fuse_projections", False)))
    if changes:
        raise CheckpointError("the config differs from the checkpoint's in " + ", ".join(changes) +
                              "; resume with the saved values (docs/resume_export.md: what a resume may change)")


def check_layout(ckpt: Path, meta: dict, model) -> None:
    """The checkpoint's int8 layout (weights, shapes, groups, offsets) is this model's."""
    layout, saved = quant_layout(model), meta["quant"]
    if set(saved) != set(layout):
        raise CheckpointError(f"{ckpt} does not fit this model ({type(model).__name__}, checkpoint has "
                              f"{meta.get('model_class')}): quantized weights missing "
                              f"{sorted(set(layout) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(layout))[:5]}")
    for prefix, lay in layout.items():
        for key in ("shape", "group", "global_offset"):
            if saved[prefix][key] != lay[key]:
                raise CheckpointError(f"{ckpt}: {prefix} has {key} {saved[prefix][key]} in the checkpoint, "
                                      f"{lay[key]} in the model")


def optimizer_state(ckpt: Path, meta: dict, device) -> dict:
    tensors = read_tensors(ckpt / "optimizer.safetensors", device)
    state: dict = {}
    for key, t in tensors.items():
        m = re.match(r"^state\.(\d+)\.(\w+)$", key)
        if not m:
            raise CheckpointError(f"{ckpt}/optimizer.safetensors: tensor '{key}' is not named state.INDEX.NAME")
        state.setdefault(int(m.group(1)), {})[m.group(2)] = t
    for key, v in meta["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in meta["optimizer"]["param_groups"]]
    sd = {"state": state, "param_groups": groups}
    if meta["optimizer"].get("qft") is not None:
        sd["qft"] = meta["optimizer"]["qft"]
    return sd
