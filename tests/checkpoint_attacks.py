"""What the checkpoint tests share: a tiny engine, and the ways a hostile user damages a saved checkpoint.

`reseal` re-hashes a tampered checkpoint (files and meta.json) as a tool that rewrites it would: the
damage then passes every hash, and only the field and state checks stand between it and the model.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import qft_ds
from qft_ds import checkpoint_io
from qft_ds.checkpoint_meta import MANIFEST_HASH, write_manifest_hash

ROOT = Path(__file__).resolve().parents[1]


def small_engine(tiny_llama, **qft):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["qft"].update(qft)
    engine, opt, _, _ = qft_ds.initialize(model=tiny_llama(), config=cfg)
    return engine, opt, cfg


def one_step(engine, seed):
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()


def edit_meta(ckpt: Path, change, rehash: bool = False) -> None:
    """change(meta) edits meta.json in place; meta.sha256 is left as it was, or (rehash) made to match."""
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    if rehash:
        write_manifest_hash(ckpt)


def reseal(ckpt: Path) -> None:
    """Hash every file into meta.json and meta.json into meta.sha256 again, as a save would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").unlink()
    (ckpt / MANIFEST_HASH).unlink(missing_ok=True)
    meta.pop("files", None)
    checkpoint_io.seal(ckpt, meta)


def edit_tensors(ckpt: Path, rel: str, change) -> None:
    """change(tensors) edits the dict of a safetensors file in place; then the checkpoint is resealed."""
    tensors = load_file(str(ckpt / rel))
    change(tensors)
    save_file(tensors, str(ckpt / rel))
    reseal(ckpt)
