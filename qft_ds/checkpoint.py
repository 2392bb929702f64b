"""Checkpoints of our own format: safetensors for tensors, JSON for the rest, no pickle anywhere.

A checkpoint is a folder `OUTPUT_DIR/checkpoint-STEP/`:
- `model.safetensors`: the model's state dict (int8 codes, fp32 scales, outliers, EF residual, float
  params). A tied weight is stored once; its other names are listed in meta.json as aliases;
- `optimizer.safetensors`: QFTLion state (int8 momentum codes + scales, fp32 float-param momentum);
- `rng.safetensors`: torch RNG states (CPU, CUDA) of rank 0;
- `hf/`: the model's HF config and the tokenizer, so `qft_ds export` needs nothing else;
- `meta.json`: format version, step, data position, scheduler/engine/optimizer scalars, the DeepSpeed
  config, the int8 layout of every weight, and the sha256 of every file above.

- `meta.sha256`: meta.json's own sha256 (checkpoint_meta.py), so no manifest edit loads.

Saves are atomic: under the run folder's writer lock (run_folder.py), everything is written to a hidden
temporary folder, fsynced, and renamed into place; then `OUTPUT_DIR/latest` (the folder's name) is replaced
atomically. A save that fails midway leaves the previous checkpoint and `latest` untouched (checkpoint_io.py);
one that is killed leaves leftovers that the next save or start tidies. Loads check everything, then write
(checkpoint_restore.py). A ZeRO run's checkpoint holds its int8 state split by owner (zero/checkpoint.py);
`save` and `load` pick the format.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from qft_ds import checkpoint_io as io, checkpoint_restore, comm, run_folder
from qft_ds.checkpoint_io import (  # noqa: F401  (the public names of qft_ds.checkpoint)
    LATEST, PREFIX, CheckpointError, check_config, model_tensors, read_meta, read_tensors, resolve, state_hash)
from qft_ds.nn.layout import quant_layout  # noqa: F401
from qft_ds.quant.momentum import check_checkpoint_momentum
from qft_ds.zero import checkpoint as zero_checkpoint


def save(out_dir, engine, optimizer, *, step: int, data: dict | None = None, ds_config: dict | None = None,
         tokenizer=None) -> Path:
    """Write `out_dir/checkpoint-STEP` atomically and point `out_dir/latest` at it. Rank 0 writes;
    every rank returns after the write, or raises if it failed."""
    if getattr(optimizer, "zero_stage", 0):  # ZeRO: every rank writes its own slices
        return zero_checkpoint.save(out_dir, engine, optimizer, step=step, data=data, ds_config=ds_config,
                                    tokenizer=tokenizer)
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step}"
    error = None
    if comm.rank() == 0:
        try:
            with run_folder.locked(out_dir):  # refused if another live run writes here
                _write(out_dir, final, engine, optimizer, step, data or {}, ds_config, tokenizer)
        except BaseException as e:  # the other ranks learn of it below rather than wait forever
            error = e
    if comm.max_over_ranks(error is not None):  # also the barrier: every rank returns after the write
        raise error if error is not None else CheckpointError(f"rank 0 could not save {final} (see its error)")
    return final


def _write(out_dir, final, engine, optimizer, step, data, ds_config, tokenizer) -> None:
    model = engine.module if hasattr(engine, "module") else engine
    tmp = io.temp_folder(final, os.getpid())
    tmp.mkdir()  # the umask's mode, as any folder the user makes
    try:
        tensors, aliases = model_tensors(model)
        io.save_tensors(tensors, tmp / "model.safetensors")
        osd = optimizer.state_dict()
        opt_tensors, opt_scalars = io.optimizer_tensors(osd)
        io.save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        io.save_rng_and_hf(tmp, model, tokenizer)
        io.seal(tmp, io.base_meta(engine, model, step, data, aliases, osd, opt_scalars, ds_config))
        io.publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def load(path, engine, optimizer, *, ds_config: dict | None = None, verify: bool = True) -> dict:
    """Restore model, optimizer, scheduler, engine counters and RNG from a checkpoint (or a run folder's
    latest). Returns its meta (step, data position). Nothing is changed if a check fails."""
    ckpt = resolve(path)
    raw = io.parse_meta(ckpt)  # only to pick the format: both loads read and check it
    if getattr(optimizer, "zero_stage", 0) or (isinstance(raw, dict) and "zero" in raw):  # sharded state or file
        return zero_checkpoint.load(ckpt, engine, optimizer, ds_config=ds_config, verify=verify)
    meta = read_meta(ckpt, verify=verify)
    check_config(meta, ds_config)
    check_checkpoint_momentum(meta, optimizer)  # by name, before the state's dtype checks
    model = engine.module if hasattr(engine, "module") else engine
    io.check_layout(ckpt, meta, model)
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
    osd = io.optimizer_state(ckpt, meta, device)
    checkpoint_restore.check_optimizer_state(ckpt, osd, optimizer)

    def write_model():  # every shape and dtype checked above
        for name, t in tensors.items():
            t.copy_(saved[name])
    checkpoint_restore.apply(ckpt, meta, engine, optimizer, osd, write_model)
    return meta
