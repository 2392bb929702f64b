"""What PEQA (scales) and QST (side network) need beyond QFT's DeepSpeed glue (qft_ds.engine, shared).

- the "optimizer" section names a torch.optim class ("AdamW" by default in ds_configs/peqa.json and
  qst.json); it is built here over the trainable parameters only and handed to DeepSpeed as a client
  optimizer. Weight decay applies to matrices, never to vectors or scalars (QST's gates, norms);
- "bf16": {"enabled": true} is bf16 compute (low-bit matmuls, and the forward under autocast, as for QFT);
- "gradient_clipping" is applied here, just before the optimizer's step, over the trainable parameters:
  the step then knows the pre-clip global norm, which train.py logs.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from qft_ds import comm
from qft_ds.config import QFTConfig
from qft_ds.methods.peqa import convert_peqa
from qft_ds.methods.qst import build_qst
from qft_ds.nn.precision import autocast_forward
from qft_ds.nn.qmodules import enable_checkpointing
from qft_ds.quant.lowbit import LowBitWeight

logger = logging.getLogger("qft_ds")


def split_method_config(cfg: QFTConfig, ds: dict) -> dict:
    """The optimizer section (popped from `ds`) for peqa/qst, checked; errors name the key."""
    opt = ds.pop("optimizer", None)
    if opt is None:
        raise ValueError(f'config has no "optimizer" section; method {cfg.method!r} needs one, e.g. '
                         '{"type": "AdamW", "params": {"lr": 1e-4}}')
    optimizer_class(opt.get("type"), cfg.method)  # fail early, before the model is touched
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage:
        # DeepSpeed's ZeRO would own the optimizer state: its flat partitions fit neither qft_ds's checkpoints
        # (safetensors, any world size) nor this module's clipping and non-finite-loss skip, and the state
        # it would shard is small (PEQA: one fp32 scale per weight group, QST: the side network)
        raise ValueError(f"zero_optimization.stage={stage}: method {cfg.method!r} runs stage 0 only (one device, "
                         "or plain data parallel over any number of ranks, each holding the whole trainable "
                         f"state, which is small for {cfg.method}); remove zero_optimization or set its stage to 0")
    return opt


def optimizer_class(name, method: str):
    if not isinstance(name, str):
        raise ValueError(f"optimizer.type must name a torch.optim optimizer (e.g. \"AdamW\"), got {name!r}")
    if name.lower() == "qftlion":
        raise ValueError(f"optimizer.type \"QFTLion\" trains int8 weights (method qft); method {method!r} trains "
                         "ordinary fp32 parameters: use a torch.optim optimizer such as \"AdamW\"")
    found = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
             if isinstance(getattr(torch.optim, n), type) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
             and n not in ("Optimizer", "QFTLion")}
    if name.lower() not in found:
        raise ValueError(f"optimizer.type {name!r} is not a torch.optim optimizer; method {method!r} takes one of "
                         f"{', '.join(sorted(c.__name__ for c in found.values()))}")
    return found[name.lower()]


def build_optimizer(model: torch.nn.Module, opt: dict, method: str) -> torch.optim.Optimizer:
    cls = optimizer_class(opt.get("type"), method)
    params = dict(opt.get("params", {}))
    accepted = set(inspect.signature(cls).parameters) - {"params"}
    for key in params:
        if key not in accepted:
            raise ValueError(f"unknown key 'optimizer.params.{key}'; {cls.__name__} takes {', '.join(sorted(accepted))}")
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"method {method!r} left no trainable parameter in {type(model).__name__}")
    wd = float(params.pop("weight_decay", 0.0))
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    return cls(groups, **params)


def prepare_model(model: torch.nn.Module, cfg: QFTConfig) -> torch.nn.Module:
    """The module DeepSpeed will wrap: the model itself (PEQA) or a QSTModel around it."""
    cdt = torch.bfloat16 if cfg.compute_bf16 else torch.float32
    if cfg.method == "peqa":
        convert_peqa(model, cfg.bits, cfg.group_size, cdt)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model, reentrant=False)  # PEQA: not measured with the reentrant one
        module = model
    elif cfg.method == "qst":
        module = build_qst(model, bits=cfg.bits, group_size=cfg.group_size, r=cfg.r, downsample=cfg.downsample,
                           adapter_rank=cfg.adapter_rank, compute_dtype=cdt)
    else:
        raise ValueError(f"'qft.method' {cfg.method!r} has no standard-optimizer setup")
    if cfg.compute_bf16:  # as for QFT: the rest of the forward (attention) in bf16 too, norms and loss fp32
        autocast_forward(module, torch.bfloat16)
    return module


def guard_step(engine, optimizer, max_grad_norm: float) -> None:
    """Clip before each step, and skip the step after a non-finite loss.

    After a non-finite loss, backward runs on a zero loss over the trainable parameters instead (every
    parameter then has a gradient, as DeepSpeed expects), the optimizer's step is skipped, and
    `optimizer.overflow` tells DeepSpeed, which counts it in `engine.skipped_steps` and does not step the
    LR schedule (as with QFTLion). Nothing non-finite reaches the trainable parameters.
    """
    real_backward, real_step = engine.backward, optimizer.step
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    optimizer.overflow, optimizer.qft_skip = False, False

    @functools.wraps(real_backward)
    def backward(loss, *args, **kwargs):
        if comm.finite_on_every_rank(loss):  # ranks must skip together
            return real_backward(loss, *args, **kwargs)
        optimizer.qft_skip = True
        logger.warning(f"step {engine.global_steps} skipped: non-finite loss {loss.item()} "
                       f"(skipped steps so far: {engine.skipped_steps + 1})")
        real_backward(sum(p.sum() * 0.0 for p in trainable), *args, **kwargs)
        return loss.detach()

    @functools.wraps(real_step)
    def step(*args, **kwargs):
        optimizer.overflow, skip = optimizer.qft_skip, optimizer.qft_skip
        optimizer.qft_skip = False
        if skip:
            return None
        grads = [p.grad for p in trainable if p.grad is not None]
        if not grads:
            return real_step(*args, **kwargs)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if max_grad_norm > 0 and norm > max_grad_norm:
            torch._foreach_mul_(grads, max_grad_norm / (float(norm) + 1e-6))
        optimizer._global_grad_norm = float(norm)  # DeepSpeed copies it: engine.get_global_grad_norm()
        return real_step(*args, **kwargs)

    engine.backward, optimizer.step = backward, step


def state_nbytes(model: torch.nn.Module, optimizer) -> dict:
    """Bytes of model state (low-bit weights, other tensors) and optimizer state, and parameter counts."""
    weights = [m for m in model.modules() if isinstance(m, LowBitWeight)]
    lowbit_ids = {id(t) for w in weights for t in (w.packed, w.zeros, w.scale, w.layout)}
    quantized = sum(w.numel for w in weights)
    lowbit_bytes = sum(w.state_nbytes() for w in weights)
    seen, other = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in lowbit_ids and id(t) not in seen:
            seen.add(id(t))
            other += t.numel() * t.element_size()
    opt_bytes = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"quantized_params": quantized, "lowbit_bytes": lowbit_bytes,
            "bytes_per_quantized_param": lowbit_bytes / max(quantized, 1), "other_model_bytes": other,
            "trainable_params": trainable, "optimizer_bytes": opt_bytes}
