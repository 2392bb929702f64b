"""DeepSpeed glue: `qft_ds.initialize` mirrors `deepspeed.initialize` for every method (qft, peqa, qst).

What it does with the JSON config before DeepSpeed sees it:
- `"qft"` is parsed into a QFTConfig (unknown keys are errors) and converts the model;
- the "optimizer" section is built here and handed to DeepSpeed as a client optimizer: QFTLion for QFT
  (DeepSpeed would hand an optimizer only parameters, and int8 weights need their modules), a torch
  optimizer for PEQA and QST (qft_ds.methods.setup);
- "fp16", "bf16", "gradient_clipping", "activation_checkpointing" and the accumulation steps are taken
  over the same way for every method (config.take_deepspeed_sections); QFT's ZeRO stage too (DeepSpeed
  gets stage 0, qft_ds.zero shards the int8 state).
Everything else (batch sizes, the "scheduler" section, logging) stays DeepSpeed's. After DeepSpeed's
initialize, the quantized weights (buffers, which DeepSpeed does not broadcast) are broadcast from rank
0, and the engine's `backward` is guarded: a non-finite loss on any rank skips the step on every rank.
That covers every loop that calls `engine.backward`: train.py, user scripts, HF Trainer and accelerate.
"""
from __future__ import annotations

import copy
import functools
import os

import torch

from qft_ds import comm
from qft_ds.config import QFTConfig, load_ds_config, take_deepspeed_sections, wants_qft
from qft_ds.launch_env import prepare_process, skip_cpu_shm_build
from qft_ds.methods import setup as methods_setup
from qft_ds.nn import streaming
from qft_ds.nn.convert import convert_model, is_converted, quantized_weights
from qft_ds.nn.chunked_loss import install_chunked_loss
from qft_ds.nn.coverage import decays
from qft_ds.nn.norms import fuse_rms_norms
from qft_ds.nn.offload import offload_saved_tensors
from qft_ds.nn.precision import autocast_forward
from qft_ds.nn.qmodules import enable_checkpointing, mark_checkpointed
from qft_ds.optim.lion import QFTLion
from qft_ds.optim.sharding import NoSharding
from qft_ds.quant.hybrid import HybridWeight
from qft_ds.quant.lowbit import LowBitWeight
from qft_ds.schedule import build_warmup_schedule
from qft_ds.zero.sharding import ZeroSharding

_OPTIMIZER_KEYS = ("lr", "betas", "weight_decay")
_ds_initialize = None  # the real deepspeed.initialize, saved before qft_ds wraps it


def split_config(ds: dict, world_size: int = 1):
    """(QFTConfig, optimizer params, the config DeepSpeed gets). Raises naming the offending key."""
    ds = copy.deepcopy(ds)
    auto = _auto_keys({k: v for k, v in ds.items() if k != "qft"})  # "auto" is a real value in the qft section
    if auto:
        raise ValueError(f"config value \"auto\" at {', '.join(auto)}: only HF Trainer and accelerate resolve "
                         "\"auto\"; with train.py or deepspeed.initialize use explicit values "
                         "(ds_configs/qft.json), with Trainer/accelerate use ds_configs/qft_hf.json")
    cfg = QFTConfig.from_dict(ds.pop("qft", {}))
    if cfg.method == "qft":
        opt = _qftlion_params(ds.pop("optimizer", None))
        cfg.zero_stage = zero_stage(ds)
        cfg.comm_dtype = communication_dtype(ds, cfg.zero_stage)
    else:  # peqa, qst: a torch optimizer (its whole section)
        opt = methods_setup.split_method_config(cfg, ds)
    take_deepspeed_sections(cfg, ds, world_size)
    return cfg, opt, ds


def _qftlion_params(opt: dict | None) -> dict:
    if opt is None:
        raise ValueError('config has no "optimizer" section; add {"type": "QFTLion", "params": {"lr": 2e-5}}')
    if str(opt.get("type", "")).lower() != "qftlion":
        raise ValueError(f"optimizer.type must be \"QFTLion\" for qft method 'qft', got {opt.get('type')!r}")
    params = dict(opt.get("params", {}))
    for key in params:
        if key not in _OPTIMIZER_KEYS:
            raise ValueError(f"unknown key 'optimizer.params.{key}'; QFTLion takes {', '.join(_OPTIMIZER_KEYS)}")
    return params


def communication_dtype(ds: dict, stage: int) -> str:
    """DeepSpeed's "communication_data_type" for QFT's gradient reduction: "fp32" (default: the mean of the
    ranks' gradients with the bits of one device's) or "bf16" (data parallel only: half NCCL's bytes; the
    sum of the ranks' bf16 gradients is rounded to bf16 once). DeepSpeed still reads the key for the float
    parameters' gradients, which it reduces itself."""
    value = ds.get("communication_data_type")
    if value is None:
        return "fp32"
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    if not isinstance(value, str) or value.lower() not in names:
        raise ValueError(f"communication_data_type must be \"fp32\" or \"bf16\" for method qft, got {value!r}")
    dtype = names[value.lower()]
    if dtype == "bf16" and stage:
        raise ValueError(f"communication_data_type \"bf16\" applies to data parallel (zero_optimization.stage 0); "
                         f"stage {stage} reduce-scatters QFT's gradients in fp32: remove the key or use stage 0")
    return dtype


def zero_stage(ds: dict) -> int:
    """qft_ds shards the int8 state itself (qft_ds.zero): DeepSpeed's ZeRO flattens trainable parameters
    into fp32 slices and cannot hold int8 weights. So the stage is read here and DeepSpeed gets 0."""
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise ValueError("zero_optimization.offload_optimizer/offload_param: qft_ds keeps its int8 state on the "
                         "device; offloading is not supported")
    if "zero_optimization" in ds:
        ds["zero_optimization"] = {**zero, "stage": 0}
    return stage


def _auto_keys(obj, prefix="") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def guard_backward(engine, opt: QFTLion) -> None:
    """Skip backward for a non-finite loss (nothing non-finite may reach the int8 state), and run the
    fused flow's norm-only backward first where clipping needs it (QFTLion.before_backward)."""
    real = engine.backward

    @functools.wraps(real)
    def backward(loss, *args, **kwargs):
        if opt.before_backward(loss, lambda l: real(l, retain_graph=True)):
            return real(loss, *args, **kwargs)
        return loss.detach()  # engine.step() still runs: the optimizer then skips the step

    engine.backward = backward


def build_optimizer(model: torch.nn.Module, cfg: QFTConfig, params: dict) -> QFTLion:
    """Two groups: quantized weights get weight decay; norms and biases do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decays(p) else no_decay).append(p)  # weight matrices, quantized or fp32 (nn.coverage)
    wd = float(params.get("weight_decay", 0.0))
    groups = [{"params": decay, "weight_decay": wd}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = dict(lr=float(params.get("lr", 1e-4)), betas=tuple(params.get("betas", (0.9, 0.99))),
                  weight_decay=wd, rounding=cfg.rounding, flow=cfg.resolved_flow(), block_size=cfg.block_size,
                  seed=cfg.seed, max_grad_norm=cfg.max_grad_norm, backend=cfg.backend,
                  outlier_refresh=cfg.outlier_refresh, outlier_frac=cfg.outlier_frac, clip_mode=cfg.clip_mode,
                  momentum_bits=cfg.momentum_bits, rand_bits=cfg.rand_bits)
    # the ZeRO stage picks where the int8 state lives; placed once torch.distributed is up (opt.shard())
    sharding = (ZeroSharding(cfg.zero_stage) if cfg.zero_stage
                else NoSharding(reduce_dtype=torch.bfloat16 if cfg.comm_dtype == "bf16" else torch.float32))
    return QFTLion(groups, sharding=sharding, **kwargs)


def prepare_model(model: torch.nn.Module, cfg: QFTConfig, progress: bool = False):
    """Convert (once) and set up checkpointing; returns the HybridWeights."""
    if streaming.is_skeleton(model):  # loaded with stream=True: converted as its checkpoint is read
        weights = streaming.convert_skeleton(model, cfg, progress=progress)
    elif is_converted(model):
        weights = quantized_weights(model)
        fused = getattr(model, "_qft_fuse_projections", cfg.fuse_projections)
        if fused != cfg.fuse_projections:
            raise ValueError(f"the model was converted with fuse_projections={fused} but 'qft.fuse_projections' is "
                             f"{cfg.fuse_projections}: convert with the config's value, or let initialize convert")
    else:
        weights = convert_model(model, group_size=cfg.group_size, outlier_frac=cfg.outlier_frac,
                                compute_dtype=torch.bfloat16 if cfg.compute_bf16 else torch.float32,
                                error_feedback=cfg.rounding == "ef", progress=progress,
                                fuse_projections=cfg.fuse_projections)
    if cfg.fuse_norms:
        fuse_rms_norms(model)
    if cfg.chunked_loss:  # inside the autocast wrapper: the loss runs under the same precision as the model
        install_chunked_loss(model, cfg.chunked_loss)
    if cfg.compute_bf16:
        autocast_forward(model, torch.bfloat16)
    if cfg.cpu_checkpointing:  # around the whole forward, so the chunked loss's saved tensors go too
        offload_saved_tensors(model)
    if cfg.gradient_checkpointing:
        # Reentrant (default): each layer's first forward runs under no_grad, with no autograd graph and no
        # saved-tensor hooks, and backward recomputes then backpropagates it: 1.15-1.23x faster 1.1B steps
        # than non-reentrant (bench/NOTES.md), the same numbers (tests/nn/test_qmodules.py).
        enable_checkpointing(model, cfg.checkpoint_reentrant)
    if cfg.reuse_recomputed_weight:
        mark_checkpointed(model)  # also when the caller enabled checkpointing before initialize
    return weights


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None, config_params=None,
               progress: bool = False, **kwargs):
    """Like `deepspeed.initialize`, for a config that selects a qft_ds method. Returns (engine, optimizer,
    loader, sched)."""
    if model is None:
        raise ValueError("qft_ds.initialize needs the model")
    if optimizer is not None:
        raise ValueError("qft_ds builds the optimizer from the config's \"optimizer\" section; do not pass optimizer=")
    config = config if config is not None else config_params
    if config is None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (dict or JSON path) or args.deepspeed_config")
    prepare_process()  # `python script.py`: rank 0 of 1, before DeepSpeed would try MPI discovery
    cfg, opt_section, ds = split_config(load_ds_config(config), int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.method == "qft":
        module = model
        prepare_model(model, cfg, progress=progress and int(os.environ.get("RANK", "0")) == 0)
        opt = build_optimizer(model, cfg, opt_section)
    else:
        if streaming.is_skeleton(model):
            raise ValueError(f"qft.method '{cfg.method}' needs a whole model: load it without stream=True (only "
                             "the qft method converts a model as its checkpoint is read)")
        module = methods_setup.prepare_model(model, cfg)
        opt = methods_setup.build_optimizer(module, opt_section, cfg.method)
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # DeepSpeed would prefer it over the rewritten config
    if kwargs.get("lr_scheduler") is None:  # a warm-up whose first step has lr > 0 (qft_ds.schedule)
        kwargs["lr_scheduler"] = build_warmup_schedule(ds, opt)
    ds_init = _ds_initialize or _import_deepspeed().initialize
    engine, ds_opt, loader, sched = ds_init(args=args, model=module, optimizer=opt, config=ds, **kwargs)
    if engine.gradient_accumulation_steps() != cfg.gradient_accumulation_steps:
        raise ValueError(f"gradient_accumulation_steps: DeepSpeed resolved {engine.gradient_accumulation_steps()} "
                         f"but qft_ds read {cfg.gradient_accumulation_steps}; set it explicitly in the config")
    # DeepSpeed broadcasts rank 0's Parameters; quantized weights are buffers, so qft_ds does it (a model
    # initialised differently per rank would otherwise train N different models, or mismatch ZeRO shards)
    # (not a weight whose ZeRO-3 slice was cut while streaming: every rank read it from the same checkpoint)
    comm.broadcast_from_rank0([b for m in module.modules() if isinstance(m, (HybridWeight, LowBitWeight))
                               and not hasattr(m, "_qft_preshard") for b in m.buffers(recurse=False)])
    if cfg.method == "qft":
        if engine.dp_world_size == 1:
            # DeepSpeed would flatten, "all-reduce" over one rank and copy back the float params' gradients
            # every step: pure host time in a host-bound step (bench/NOTES.md)
            engine.enable_backward_allreduce = False
        opt.shard()
        opt.init_state()
        opt.ops  # the op table for where DeepSpeed put the weights: a backend that cannot run there is an error now
        guard_backward(engine, opt)
    else:
        methods_setup.guard_step(engine, opt, cfg.max_grad_norm)
    engine.qft_config = cfg
    return engine, ds_opt, loader, sched


def _import_deepspeed():
    import deepspeed
    return deepspeed


def install_deepspeed_hook() -> bool:
    """Make plain `deepspeed.initialize` route QFT configs here, and `torch.optim.QFTLion` resolvable.

    DeepSpeed has no optimizer plugin registry and would hand QFTLion only parameters, so the model
    must be converted before the optimizer exists: wrapping `deepspeed.initialize` is the one place
    that sees both. Configs without a "qft" section or QFTLion pass through untouched.
    """
    global _ds_initialize
    torch.optim.QFTLion = QFTLion
    try:
        deepspeed = _import_deepspeed()
    except ImportError:
        return False
    if getattr(deepspeed.initialize, "_qft_wrapped", False):
        return True
    _ds_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        names = ("args", "model", "optimizer", "model_parameters")
        kw = dict(zip(names, args), **kwargs)
        config = kw.get("config") or kw.get("config_params") or getattr(kw.get("args"), "deepspeed_config", None)
        if config is not None and wants_qft(load_ds_config(config)):
            return globals()["initialize"](**kw)
        prepare_process()
        return _ds_initialize(*args, **kwargs)

    initialize._qft_wrapped = True
    initialize.__doc__ = _ds_initialize.__doc__
    deepspeed.initialize = initialize
    return True


# importing the glue installs it (DeepSpeed's import runs this module: qft_ds.import_hooks)
install_deepspeed_hook()
skip_cpu_shm_build()  # decides when DeepSpeed would build it: see launch_env
