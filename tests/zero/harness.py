"""Shared pieces of the ZeRO tests: gloo ranks, tiny models, injected-gradient and real training loops,
and the whole int8 state of a run gathered into one dict for comparison."""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_tiny_llama
from qft_ds.config import QFTConfig
from qft_ds.engine import build_optimizer
from qft_ds.flow import deliver
from qft_ds.nn import convert_model, quantized_weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, world: int = 2) -> None:
    """Run fn(rank, world, port, *args) on `world` gloo ranks."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)  # 2 ranks on 2 cores; also makes CPU matmuls reproducible across processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still completes its last collective
    finally:
        dist.destroy_process_group()
    leave()


def leave() -> None:
    """End a spawned rank whose work is done and saved. At interpreter exit gloo can still hold a joinable
    thread, which aborts the process ("terminate called without an active exception", SIGABRT; a rare
    flake): leave without running the C++ static destructors. Call it only after the work succeeded, so that
    a failure still raises and fails the spawn."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build(stage: int, flow: str = "fused", rounding: str = "sr", clip: float = 0.0, outlier_refresh: int = 0,
          momentum_bits: int = 8, comm_dtype: str = "fp32"):
    """A converted tiny LLaMA (tied embedding/head) and its optimizer: QFTLion, unsharded at stage 0, else
    given ZeroSharding and sharded. Groups of 32 columns and momentum blocks of 64 give 64-element units: many per weight."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    convert_model(model, group_size=32, outlier_frac=0.02, error_feedback=rounding == "ef")
    cfg = QFTConfig(flow=flow, rounding=rounding, block_size=64, max_grad_norm=clip, outlier_refresh=outlier_refresh,
                    gradient_accumulation_steps=2 if flow == "stack" else 1, momentum_bits=momentum_bits)
    cfg.zero_stage, cfg.comm_dtype = stage, comm_dtype
    opt = build_optimizer(model, cfg, {"lr": 2e-3, "weight_decay": 0.1})
    if stage:
        opt.shard()
    opt.init_state()
    return model, opt


def inject_steps(model, opt, steps, start=0):
    """Deterministic gradients, the same on every rank: the mean over ranks is exactly each rank's
    ((g + g) / 2 == g in floating point), so any difference from one device is the sharding's."""
    weights = quantized_weights(model)
    micro = 2 if opt.flow.mode == "stack" else 1
    for step in range(start, start + steps):
        for k in range(micro):
            g = torch.Generator().manual_seed(1000 * step + k)
            for w in reversed(weights):
                for _ in range(w.n_uses):  # a tied weight gets one gradient per use
                    deliver(w, torch.randn(w.shape, generator=g) * 0.01)
            for p in model.parameters():
                if not hasattr(p, "_qft_weight"):
                    grad = torch.randn(p.shape, generator=g) * 0.01
                    p.grad = grad if p.grad is None else p.grad + grad
        opt.step()
        opt.zero_grad()


def data_steps(model, opt, rank, world, steps, batch=8, seq=16, backward=None):
    """Real forward/backward: a global batch of `batch` split over ranks; float-parameter gradients are
    all-reduced as DeepSpeed's engine does. Returns the losses of rank 0's part of each step.
    `backward(loss)`: loss.backward() by default; opt.backward also runs clipping's norm-only pass."""
    g = torch.Generator().manual_seed(1)
    micro = 2 if opt.flow.mode == "stack" else 1
    losses = []
    for _ in range(steps):
        for _ in range(micro):
            x = torch.randint(0, 128, (batch, seq), generator=g)
            per = batch // world
            xb = x[rank * per:(rank + 1) * per].to(model.device)
            loss = model(input_ids=xb, labels=xb).loss
            (backward or torch.Tensor.backward)(loss / micro)
            losses.append(loss.item())
        if world > 1:
            for p in model.parameters():
                if p.grad is not None and p.grad.numel():
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        opt.zero_grad()
    return losses


def full_state(model, opt) -> dict:
    """Every int8 weight, outlier, residual and momentum tensor of the run, whole (gathered over ranks),
    plus the float parameters. Called on every rank (it runs collectives when sharded)."""
    out = {}
    shards = opt.zero_stage > 0
    for i, w in enumerate(quantized_weights(model)):
        codes, scales, idx, val = w.full_state()
        out.update({f"{i}.codes": codes.clone(), f"{i}.scales": scales.clone(), f"{i}.oidx": idx.clone(),
                    f"{i}.oval": val.clone()})
        st = opt.state[w.anchor]
        parts = {"m_codes": st["m_codes"], "m_scales": st["m_scales"]}
        if w.residual is not None:
            parts["residual"] = w.residual
        for name, t in parts.items():
            out[f"{i}.{name}"] = _gather_slices(t) if shards else t.clone()
    for name, p in model.named_parameters():
        if not hasattr(p, "_qft_weight"):
            out[name] = p.detach().clone()
    return out


def _gather_slices(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's slice (they are contiguous and in rank order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.clone()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.numel()]))
    width = max(int(s) for s in sizes)
    pad = torch.zeros(width, dtype=t.dtype)
    pad[:t.numel()] = t
    bufs = [torch.zeros(width, dtype=t.dtype) for _ in sizes]
    dist.all_gather(bufs, pad)
    return torch.cat([b[:int(s)] for b, s in zip(bufs, sizes)])


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: differ in {bad[:6]}"
