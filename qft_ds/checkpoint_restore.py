"""Restoring a checkpoint all or nothing: check every piece against the live run, then write.

A load first checks what it will write: the optimizer state (group and parameter counts, every state
tensor's shape and dtype against the live optimizer's), the scheduler's keys, the RNG state, and (in the
callers) every model tensor. Only then does it write, in an order that can be undone: the optimizer (a
failure loads its previous state back), then the model tensors, counters and RNG, which cannot fail once
checked. Plain (checkpoint.py) and ZeRO (zero/checkpoint.py) loads both end here.
"""
from __future__ import annotations

import torch

from qft_ds.checkpoint_io import read_tensors
from qft_ds.run_folder import CheckpointError


def check_optimizer_state(ckpt, osd: dict, optimizer) -> None:
    """`osd` fits `optimizer`: groups, parameter counts, and each state tensor's shape and dtype."""
    groups, saved = optimizer.param_groups, osd["param_groups"]
    if len(saved) != len(groups):
        raise CheckpointError(f"{ckpt}: the optimizer has {len(saved)} parameter groups in the checkpoint, "
                              f"{len(groups)} in this run")
    param_of = {}
    for i, (g, s) in enumerate(zip(groups, saved)):
        if len(s["params"]) != len(g["params"]):
            raise CheckpointError(f"{ckpt}: optimizer group {i} has {len(s['params'])} parameters in the checkpoint, "
                                  f"{len(g['params'])} in this run")
        param_of.update(zip(s["params"], g["params"]))  # torch matches saved and live params by position
    if hasattr(optimizer, "init_state"):  # QFTLion: the int8 momentum as this run keeps it (lazy zeros otherwise)
        optimizer.init_state()
    for idx, st in osd["state"].items():
        if idx not in param_of:
            raise CheckpointError(f"{ckpt}: optimizer state for parameter {idx}, which no group lists")
        p = param_of[idx]
        live = optimizer.state.get(p, {})
        for key, v in st.items():
            if not torch.is_tensor(v):
                continue
            ref = live.get(key)
            if torch.is_tensor(ref):
                want = (ref.dtype, tuple(ref.shape))
            elif v.numel() == 1 and v.dim() <= 1:  # a step counter (torch's AdamW)
                continue
            else:
                want = (v.dtype if v.is_floating_point() else None, tuple(p.shape))
            if (v.dtype, tuple(v.shape)) != want:
                raise CheckpointError(f"{ckpt}: optimizer state '{idx}.{key}' is {v.dtype}{list(v.shape)} in the "
                                      f"checkpoint; this run needs {want[0]}{list(want[1])}")
        missing = [k for k, ref in live.items() if torch.is_tensor(ref) and k not in st]
        if missing:
            raise CheckpointError(f"{ckpt}: optimizer state of parameter {idx} lacks {missing}")
    # int8 momentum always exists (allocated at initialize): a checkpoint without it is damaged
    lacking = [i for i, p in param_of.items() if getattr(p, "_qft_weight", None) is not None
               and optimizer.state.get(p) and i not in osd["state"]]
    if lacking:
        raise CheckpointError(f"{ckpt}: no int8 momentum for parameter(s) {lacking[:5]}")


def read_rng(ckpt) -> dict:
    rng = read_tensors(ckpt / "rng.safetensors")
    cpu = rng.get("cpu")
    want = torch.get_rng_state()
    if cpu is None or cpu.dtype != want.dtype or cpu.shape != want.shape:
        raise CheckpointError(f"{ckpt}/rng.safetensors: no CPU RNG state of {want.dtype}{list(want.shape)}")
    return rng


def check_scheduler(ckpt, meta: dict, engine) -> None:
    sched = getattr(engine, "lr_scheduler", None)
    saved = meta["scheduler"]
    if sched is None or saved is None:
        return
    if set(saved) != set(sched.state_dict()):
        raise CheckpointError(f"{ckpt}/meta.json: \"scheduler\" has keys {sorted(saved)}; this run's "
                              f"{type(sched).__name__} keeps {sorted(sched.state_dict())}")


def apply(ckpt, meta: dict, engine, optimizer, osd: dict, write_model) -> None:
    """Write a checked state: optimizer (undone on failure), then `write_model()`, scheduler, counters, RNG."""
    rng = read_rng(ckpt)
    check_scheduler(ckpt, meta, engine)
    before = optimizer.state_dict()  # references, not copies: loading it back undoes a failed load
    try:
        optimizer.load_state_dict(osd)
    except Exception as e:
        optimizer.load_state_dict(before)
        raise CheckpointError(f"{ckpt}: the optimizer state does not load ({e}); nothing was changed") from None
    write_model()
    _restore_run_state(meta, engine, rng)


def _restore_run_state(meta: dict, engine, rng: dict) -> None:
    """The LR scheduler (its lr recomputed for this config: a longer schedule applies from the next step),
    the engine's counters and the torch RNG."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and meta["scheduler"] is not None:
        sched.load_state_dict(meta["scheduler"])
        if type(sched).__module__.startswith("deepspeed.runtime.lr_schedules") and sched.last_batch_iteration >= 0:
            # the saved param-group lr came from the saved horizon; DeepSpeed's get_lr is a pure function of
            # the iteration and this config, so with an unchanged config it is the saved lr, bit for bit
            lrs = sched.get_lr()
            for g, lr in zip(sched.optimizer.param_groups, lrs):
                g["lr"] = lr
            sched._last_lr = list(lrs)
    for key, value in meta["engine"].items():
        if hasattr(engine, key):
            setattr(engine, key, value)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())
                                      if f"cuda.{i}" in rng])
