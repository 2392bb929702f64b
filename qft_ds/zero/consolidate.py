"""A sharded ZeRO checkpoint -> a plain (one-device, stage-0) checkpoint, one weight at a time.

The plain checkpoint is what `qft_ds export` and a one-device resume read. The safetensors files are
streamed: the header is computed from the shapes first (safetensors can report a tensor's shape
without reading it), then each tensor is assembled from the ranks' pieces, written and dropped, so
memory holds one weight (plus the small replicated tensors), never a whole shard or model.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from qft_ds import checkpoint_io as io
from qft_ds.checkpoint_io import CheckpointError
from qft_ds.quant.momentum import MomentumFormat, saved_momentum_bits
from qft_ds.zero.checkpoint import DTYPES as _DTYPES, QKEYS, Pieces, shard_file

def write_streaming(path: Path, specs: list, produce) -> None:
    """Write a safetensors file from `specs` [(name, dtype, shape)], calling produce(name) for each
    tensor in turn. The format: 8-byte header length, JSON header with byte offsets, then the data."""
    header, pos = {}, 0
    for name, dtype, shape in specs:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise CheckpointError(f"consolidate: {name} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _spec(pieces: Pieces, rel: str, key: str):
    sl = pieces.open(rel).get_slice(key)
    dtype = {v: k for k, v in _DTYPES.items()}[sl.get_dtype()]
    return dtype, sl.get_shape()


def consolidate(src, out_dir) -> Path:
    """Write the plain checkpoint of ZeRO checkpoint `src` (a folder, or a run folder's latest) into the
    new folder `out_dir`. Returns out_dir."""
    src = io.resolve(src)
    meta = io.read_meta(src)
    zero = meta.get("zero")
    if zero is None:
        raise CheckpointError(f"{src} is already a plain checkpoint (no \"zero\" entry in meta.json)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a consolidate that failed
    tmp.mkdir()  # the umask's mode, as any folder the user makes
    try:
        pieces = Pieces(src, meta)
        _write_model(pieces, meta, tmp)
        _write_optimizer(pieces, meta, tmp)
        for rel in ("rng.safetensors", "hf"):
            if (src / rel).is_dir():
                shutil.copytree(src / rel, tmp / rel)
            elif (src / rel).is_file():
                shutil.copy2(src / rel, tmp / rel)
        plain = {k: v for k, v in meta.items() if k not in ("zero", "files")}
        plain["consolidated_from"] = {"world_size": zero["world_size"], "stage": zero["stage"]}
        anchors = set(zero["anchor_index"].values())
        plain["optimizer"]["scalars"] = {k: v for k, v in meta["optimizer"]["scalars"].items()
                                         if int(k.split(".", 1)[0]) not in anchors}
        io.seal(tmp, plain)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_model(pieces: Pieces, meta: dict, tmp: Path) -> None:
    rep = pieces.open("model.safetensors")
    specs = [(name, *_spec(pieces, "model.safetensors", name)) for name in rep.keys()]
    first = shard_file(0)
    for prefix, lay in meta["quant"].items():
        n = lay["shape"][0] * lay["shape"][1]
        n_out = sum(_spec(pieces, shard_file(r), f"{prefix}.outlier_idx")[1][0]
                    for r in range(meta["zero"]["world_size"]))
        sizes = {"codes": n, "scales": -(-n // lay["group"]), "outlier_idx": n_out, "outlier_val": n_out,
                 "residual": n}
        for kind in QKEYS:
            if kind == "residual" and not pieces.has(prefix, kind):
                continue
            dtype, _ = _spec(pieces, first, f"{prefix}.{kind}")
            specs.append((f"{prefix}.{kind}", dtype, [sizes[kind]]))

    def produce(name):
        prefix, kind = name.rsplit(".", 1)
        if prefix in meta["quant"] and kind in QKEYS:
            lay = meta["quant"][prefix]
            n = lay["shape"][0] * lay["shape"][1]
            if kind in ("outlier_idx", "outlier_val"):
                return pieces.outliers(prefix)[0 if kind == "outlier_idx" else 1]
            return pieces.read(prefix, kind, 0, n, lay["group"] if kind == "scales" else 1)
        return rep.get_tensor(name)
    write_streaming(tmp / "model.safetensors", specs, produce)


def _write_optimizer(pieces: Pieces, meta: dict, tmp: Path) -> None:
    zero = meta["zero"]
    fmt = MomentumFormat(saved_momentum_bits(meta["optimizer"].get("qft")), zero["block_size"])
    rep = pieces.open("optimizer.safetensors")
    specs = [(name, *_spec(pieces, "optimizer.safetensors", name)) for name in rep.keys()]
    keys = {}
    for prefix, idx in zero["anchor_index"].items():
        lay = meta["quant"][prefix]
        n = lay["shape"][0] * lay["shape"][1]
        specs.append((f"state.{idx}.m_codes", fmt.dtype, [fmt.codes_len(n)]))
        specs.append((f"state.{idx}.m_scales", torch.float32, [-(-n // zero["block_size"])]))
        keys[f"state.{idx}.m_codes"] = (prefix, "m_codes", n, fmt.elements_per_code)
        keys[f"state.{idx}.m_scales"] = (prefix, "m_scales", n, zero["block_size"])

    def produce(name):
        if name in keys:
            prefix, kind, n, per = keys[name]
            return pieces.read(prefix, kind, 0, n, per)
        return rep.get_tensor(name)
    write_streaming(tmp / "optimizer.safetensors", specs, produce)
