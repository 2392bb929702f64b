"""meta.json, the checkpoint's manifest: its own hash, and the type and range of every field.

meta.json holds the sha256 of every other file, so it is itself hashed into `meta.sha256` beside it (the
`sha256sum` format: `sha256sum -c meta.sha256` checks it by hand). An edit of any field (a step, an lr, a
`files` entry removed to switch verification off) then fails verification; a field of the wrong type or
range fails validation, naming the key and the file, rather than surfacing later as a bare KeyError.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from qft_ds.hub import sha256_file
from qft_ds.run_folder import CheckpointError

MANIFEST_HASH = "meta.sha256"
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
ENGINE_KEYS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class MetaError(CheckpointError):
    """A meta.json field that is missing, of the wrong type, or out of range (the message names it)."""


def write_manifest_hash(ckpt: Path) -> None:
    (ckpt / MANIFEST_HASH).write_text(f"{sha256_file(ckpt / 'meta.json')}  meta.json\n")


def verify_manifest_hash(ckpt: Path) -> str | None:
    """None if meta.json matches meta.sha256; else what is wrong."""
    path = ckpt / MANIFEST_HASH
    if not path.is_file():
        return f"{MANIFEST_HASH} is missing (it holds meta.json's sha256)"
    try:
        digest = path.read_text(encoding="utf-8").split()[0]
    except (UnicodeDecodeError, IndexError):
        return f"{MANIFEST_HASH} is not a sha256 line"
    if digest != sha256_file(ckpt / "meta.json"):
        return f"meta.json does not match its sha256 in {MANIFEST_HASH} (the manifest was edited or damaged)"
    return None


# -- field checks ----------------------------------------------------------------------------------
class _Fields:
    """Typed getters that name the key path and the file in every error."""

    def __init__(self, where):
        self.where = where

    def fail(self, key: str, value, expected: str):
        raise MetaError(f"{self.where}: \"{key}\" is {str(value)[:80] if value is not _MISSING else 'missing'}; "
                        f"expected {expected}")

    def get(self, d: dict, key: str, path: str, types, expected: str, optional: bool = False):
        value = d.get(key, _MISSING)
        if value is _MISSING and optional:
            return None
        if value is _MISSING or not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            self.fail(path, value, expected)
        return value

    def int(self, d, key, path, lo=0, hi=None, optional=False):
        v = self.get(d, key, path, int, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""), optional)
        if v is not None and (v < lo or (hi is not None and v > hi)):
            self.fail(path, v, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return v

    def number(self, d, key, path, lo=0.0, hi=math.inf, optional=True):
        v = self.get(d, key, path, (int, float), f"a finite number in [{lo}, {hi}]", optional)
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            self.fail(path, v, f"a finite number in [{lo}, {hi}]")
        return v


_MISSING = object()


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def check_meta(meta: dict, where) -> None:
    """Every field read by a load: present, of its type, in range. Raises MetaError naming the key."""
    f = _Fields(where)
    f.get(meta, "qft_ds_version", "qft_ds_version", str, "a version string")
    f.int(meta, "step", "step")
    f.get(meta, "data", "data", dict, "an object (the data position)")
    f.get(meta, "model_class", "model_class", str, "a class name")
    f.get(meta, "fuse_projections", "fuse_projections", bool, "true or false", optional=True)
    for k, v in f.get(meta, "aliases", "aliases", dict, "an object {name: first name}").items():
        f.get({k: v}, k, f"aliases.{k}", str, "a tensor name")
    quant = f.get(meta, "quant", "quant", dict, "an object {weight: layout}")
    for prefix, lay in quant.items():
        p = f"quant.{prefix}"
        f.get(quant, prefix, p, dict, "an object")
        shape = f.get(lay, "shape", f"{p}.shape", list, "[rows, columns]")
        if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            f.fail(f"{p}.shape", shape, "[rows, columns], two positive integers")
        f.int(lay, "group", f"{p}.group", lo=1)
        f.int(lay, "global_offset", f"{p}.global_offset")
        f.get(lay, "modules", f"{p}.modules", dict, "an object {module: kind}")
    engine = f.get(meta, "engine", "engine", dict, f"an object with {', '.join(ENGINE_KEYS)}")
    if set(engine) != set(ENGINE_KEYS):
        f.fail("engine", sorted(engine), f"exactly the keys {', '.join(ENGINE_KEYS)}")
    for k in ENGINE_KEYS:
        f.int(engine, k, f"engine.{k}")
    sched = f.get(meta, "scheduler", "scheduler", (dict, type(None)), "an object or null")
    if sched is not None and "last_batch_iteration" in sched:
        f.int(sched, "last_batch_iteration", "scheduler.last_batch_iteration", lo=-1)
    f.get(meta, "ds_config", "ds_config", (dict, type(None)), "an object or null")
    _check_optimizer(f, f.get(meta, "optimizer", "optimizer", dict, "an object"))
    _check_files(f, f.get(meta, "files", "files", dict, "an object {file: sha256}"))
    if "zero" in meta:
        _check_zero(f, f.get(meta, "zero", "zero", dict, "an object"), quant)


def _check_optimizer(f: _Fields, opt: dict) -> None:
    groups = f.get(opt, "param_groups", "optimizer.param_groups", list, "a list of parameter groups")
    if not groups:
        f.fail("optimizer.param_groups", groups, "at least one parameter group")
    seen = set()
    for i, g in enumerate(groups):
        p = f"optimizer.param_groups[{i}]"
        f.get({"g": g}, "g", p, dict, "an object")
        params = f.get(g, "params", f"{p}.params", list, "a list of parameter indices")
        for j, idx in enumerate(params):
            f.int({"i": idx}, "i", f"{p}.params[{j}]")
            if idx in seen:
                f.fail(f"{p}.params[{j}]", idx, "an index listed once over all groups")
            seen.add(idx)
        f.number(g, "lr", f"{p}.lr")
        f.number(g, "weight_decay", f"{p}.weight_decay")
        f.number(g, "eps", f"{p}.eps")
        betas = g.get("betas")
        if betas is not None and (not isinstance(betas, list) or len(betas) != 2):
            f.fail(f"{p}.betas", betas, "[beta1, beta2]")
        for j, b in enumerate(betas or []):
            f.number({"b": b}, "b", f"{p}.betas[{j}]", hi=1.0, optional=False)
    qft = f.get(opt, "qft", "optimizer.qft", (dict, type(None)), "an object or null", optional=True)
    if qft is not None:
        for k in ("step_count", "skipped_steps", "partial_steps", "nonfinite_tensors"):
            f.int(qft, k, f"optimizer.qft.{k}", optional=k != "step_count")
        f.int(qft, "block_size", "optimizer.qft.block_size", lo=1)
        if qft.get("prev_grad_norm") is not None:
            f.number(qft, "prev_grad_norm", "optimizer.qft.prev_grad_norm")
        f.get(qft, "clip", "optimizer.qft.clip", (dict, type(None)), "an object or null", optional=True)
    scalars = f.get(opt, "scalars", "optimizer.scalars", dict, "an object {index.name: value}")
    for k in scalars:
        if not re.match(r"^\d+\.\w+$", k) or int(k.split(".")[0]) not in seen:
            f.fail(f"optimizer.scalars.{k}", k, "INDEX.NAME with INDEX one of the param groups' indices")


def _check_files(f: _Fields, files: dict) -> None:
    for name in REQUIRED_FILES:
        if name not in files:
            f.fail(f"files.{name}", _MISSING, "its sha256 (every checkpoint hashes this file)")
    for rel, digest in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            f.fail(f"files.{rel}", rel, "a path inside the checkpoint folder")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            f.fail(f"files.{rel}", digest, "a sha256 (64 lowercase hex digits)")


def _check_zero(f: _Fields, zero: dict, quant: dict) -> None:
    world = f.int(zero, "world_size", "zero.world_size", lo=1)
    f.int(zero, "stage", "zero.stage", lo=0, hi=3)
    f.int(zero, "block_size", "zero.block_size", lo=1)
    bounds = f.get(zero, "bounds", "zero.bounds", dict, "an object {weight: [[lo, hi] per rank]}")
    anchors = f.get(zero, "anchor_index", "zero.anchor_index", dict, "an object {weight: optimizer index}")
    for name, d in (("bounds", bounds), ("anchor_index", anchors)):
        if set(d) != set(quant):
            f.fail(f"zero.{name}", sorted(set(d) ^ set(quant))[:3], "exactly the weights listed in \"quant\"")
    for prefix, b in bounds.items():
        numel = quant[prefix]["shape"][0] * quant[prefix]["shape"][1]
        ok = isinstance(b, list) and len(b) == world and all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) for r in b)
        # the ranks' slices tile the weight in order: [0, a), [a, b), ..., [y, numel)
        ok = ok and b[0][0] == 0 and b[-1][1] == numel and all(lo <= hi for lo, hi in b) and \
            all(b[i][1] == b[i + 1][0] for i in range(world - 1))
        if not ok:
            f.fail(f"zero.bounds.{prefix}", b, f"{world} slices [lo, hi) tiling [0, {numel}) in rank order")
        f.int(anchors, prefix, f"zero.anchor_index.{prefix}")
