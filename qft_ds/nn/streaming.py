"""Streaming conversion: a model that does not fit host memory converts one weight at a time.

The model is built as a skeleton whose parameters sit on the meta device (accelerate's init_empty_weights:
buffers such as rotary `inv_freq` are still computed for real). `convert_model` then asks a *source* for each
weight it quantizes, in its usual module order, so offsets, fusing and tied weights are exactly the ordinary
path's; the full-precision copy is dropped as soon as its HybridWeight exists. Whatever stays fp32 (norms,
biases, fp32 matrices) is materialised last, one parameter at a time. Two sources:
- `CheckpointSource`: a Hugging Face folder of safetensors (sharded with model.safetensors.index.json, or one
  file); each tensor is read by its own short `safe_open`, so no file stays memory-mapped and host memory holds
  about one layer at a time (tests/nn/test_streaming.py counts it);
- `RandomSource`: random init straight on the device (benchmark shapes: a 70B model in bf16 does not fit the
  GPU machine's host memory).
Under ZeRO-3 each rank keeps only its slice of every weight's int8 state as it is made (qft_ds.zero.shards.
preshard), with the layout the optimizer's sharding then adopts, so results equal convert-then-shard.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qft_ds.nn.convert import convert_model
from qft_ds.nn.experts import is_experts_module

logger = logging.getLogger("qft_ds")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_sharded_checkpoint(folder) -> bool:
    """A Hugging Face folder whose weights are safetensors shards listed in an index."""
    return (Path(folder) / INDEX).is_file()


class CheckpointSource:
    """The tensors of a safetensors folder, by name, read one at a time onto a device in a dtype."""

    def __init__(self, folder, dtype: torch.dtype = torch.float32):
        self.folder, self.dtype = Path(folder), dtype
        index = self.folder / INDEX
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            from safetensors import safe_open
            with safe_open(self.folder / SINGLE, "pt") as f:
                self.files = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder}: no {INDEX} or {SINGLE} to stream from")

    def keys(self) -> set[str]:
        return set(self.files)

    def read(self, names: list[str], device) -> torch.Tensor:
        """The tensor stored under the first of `names` (a tied parameter's aliases) the checkpoint holds."""
        from safetensors import safe_open
        key = next((n for n in names if n in self.files), None)
        if key is None:
            raise KeyError(f"{self.folder}: the checkpoint holds none of {names}")
        # a fresh open per tensor: the file's pages are unmapped again at once, so reading a whole shard
        # never leaves it resident in this process
        with safe_open(self.folder / self.files[key], "pt", device="cpu") as f:
            t = f.get_tensor(key)
        # moved first, then cast: a bf16 checkpoint crosses to the GPU at 2 bytes/param, never fp32 on the host
        return t.to(device).to(self.dtype if t.is_floating_point() else t.dtype)


class RandomSource:
    """Random init on the device, as the model's config asks (normal(0, initializer_range) weights, padding
    rows zero; the rest by the model's own _init_weights), one tensor at a time."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, seed: int = 0):
        self.model, self.dtype = model, dtype
        self.std = float(getattr(model.config, "initializer_range", 0.02))
        self.seed = seed

    def weight(self, module: nn.Module, device) -> torch.Tensor:
        w = torch.empty(module.weight.shape, device=device, dtype=self.dtype).normal_(0.0, self.std)
        pad = getattr(module, "padding_idx", None)
        if pad is not None:
            w[pad] = 0
        return w

    def materialise(self, module: nn.Module, device) -> None:
        module.to_empty(device=device, recurse=False)
        self.model._init_weights(module)


def skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of `config` with its parameters on the meta device (no memory), tied as from_pretrained
    ties them; buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def load_skeleton(folder, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A skeleton of the checkpoint in `folder`, marked to be streamed from it by `convert_skeleton`, in eval
    mode with its generation config (as from_pretrained returns it)."""
    from transformers import AutoConfig, GenerationConfig

    folder = Path(folder)
    model = skeleton(AutoConfig.from_pretrained(folder), dtype)
    model.config._name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    model._qft_stream_source = CheckpointSource(folder, dtype)
    return model


def is_skeleton(model: nn.Module) -> bool:
    return getattr(model, "_qft_stream_source", None) is not None


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): every name it has} (a tied parameter has several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def why_not_streamable(model: nn.Module, source: CheckpointSource) -> str | None:
    """Why streaming cannot convert this skeleton from this checkpoint (None if it can): every parameter must
    be stored under its own name (transformers renames some checkpoints' keys while loading: those stream
    nothing), and every layer conversion would probe by running its forward needs real weights."""
    keys = source.keys()
    missing = [names[0] for names in _aliases(model).values() if not any(n in keys for n in names)]
    if missing:
        return (f"{len(missing)} parameter(s) are not stored under their own names in the checkpoint "
                f"(first: {missing[0]})")
    moe = next((n for n, m in model.named_modules() if is_experts_module(m)), None)
    if moe is not None:
        return (f"{type(model.get_submodule(moe)).__name__} ({moe}) holds MoE experts: conversion runs their forward "
                "on real weights to check that QExperts reproduces it")
    probed = [n for n, m in model.named_modules()
              if (isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward)
              or (isinstance(m, nn.Embedding) and type(m).forward is not nn.Embedding.forward)]
    if probed:
        return (f"{type(model.get_submodule(probed[0])).__name__} ({probed[0]}) overrides forward: conversion "
                "runs it on real weights to decide whether int8 reproduces it")
    return None


@torch.no_grad()
def convert_streamed(model: nn.Module, source, device, *, on_weight=None, census=None, **convert_kwargs):
    """Convert a skeleton in place, one weight at a time from `source`, straight onto `device`; returns the
    HybridWeights (as convert_model). `on_weight(qw)` runs on each HybridWeight as it is made (ZeRO-3 slicing);
    `census()` after each tensor is read (tests count the live full-precision bytes there)."""
    device = torch.device(device)
    names = _aliases(model)
    checkpoint = isinstance(source, CheckpointSource)

    def fetch(module: nn.Module) -> torch.Tensor:
        if checkpoint:
            w = source.read(names[id(module.weight)], device)
        else:
            w = source.weight(module, device)
        if census is not None:
            census()
        return w

    weights = convert_model(model, device=device, fetch=fetch, on_weight=on_weight, **convert_kwargs)
    unread = [i for i, w in enumerate(weights) if w.codes.is_meta]
    if unread:  # a layer type that quantizes its own parameters instead of asking `fetch`
        raise RuntimeError(f"streaming conversion: {len(unread)} quantized weight(s) were made from meta tensors "
                           f"(first: #{unread[0]} of shape {weights[unread[0]].shape}); load this model whole")
    _materialise_rest(model, source, device, census)
    return weights


def _materialise_rest(model: nn.Module, source, device, census) -> None:
    """Every parameter still on the meta device, fp32 on `device` (norms, biases, fp32 matrices): a new
    Parameter that keeps the old one's tags and ties; buffers move to `device`."""
    names = _aliases(model)
    done: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if isinstance(source, RandomSource) and any(p.is_meta for p in module.parameters(recurse=False)):
            source.materialise(module, device)  # the module's own init (norms: ones)
            for leaf, p in module._parameters.items():
                if p is not None and p.dtype != torch.float32:
                    module._parameters[leaf] = _like(p, p.detach().float())
        for leaf, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            new = done.get(id(p))
            if new is None:
                new = _like(p, source.read(names[id(p)], device).float())
                done[id(p)] = new
                if census is not None:
                    census()
            module._parameters[leaf] = new
        for leaf, b in list(module._buffers.items()):
            if b is not None and b.device != device and not b.is_meta:
                module._buffers[leaf] = b.to(device)
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"streaming conversion left {len(left)} tensor(s) unmaterialised (first: {left[0]})")


def _like(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)  # conversion's tags (_qft_no_decay)
    return new


def target_device():
    """Where this process's model will live: DeepSpeed's device for LOCAL_RANK (the CPU on CPU machines)."""
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def convert_skeleton(model: nn.Module, cfg, *, progress: bool = False, device=None):
    """Convert a skeleton from `load_skeleton` with the qft config `cfg` onto `device` (default: this process's
    accelerator). At ZeRO-3 each rank keeps only its slice of each weight (the optimizer's layout)."""
    from qft_ds import comm
    from qft_ds.zero.partition import Partition
    from qft_ds.zero.shards import preshard

    on_weight = None
    if cfg.zero_stage == 3:
        if not comm.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import deepspeed
            deepspeed.init_distributed()
        world, rank = comm.world_size(), comm.rank()
        on_weight = lambda w: preshard(w, Partition(w.numel, w.group, cfg.block_size, world, rank))  # noqa: E731
    source = model.__dict__.pop("_qft_stream_source")
    return convert_streamed(
        model, source, device if device is not None else target_device(), on_weight=on_weight,
        group_size=cfg.group_size, outlier_frac=cfg.outlier_frac,
        compute_dtype=torch.bfloat16 if cfg.compute_bf16 else torch.float32, error_feedback=cfg.rounding == "ef",
        progress=progress, fuse_projections=cfg.fuse_projections)


def build_random(config, device, *, dtype: torch.dtype = torch.float32, seed: int = 0, **convert_kwargs):
    """A random-init model of `config`, converted weight by weight on `device`: no full-precision copy of more
    than one layer ever exists (benchmark shapes up to 70B). Returns (model, HybridWeights)."""
    torch.manual_seed(seed)
    model = skeleton(config, dtype)
    weights = convert_streamed(model, RandomSource(model, dtype, seed), device, **convert_kwargs)
    return model, weights
