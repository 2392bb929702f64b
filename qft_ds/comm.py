"""Every collective of qft_ds, on the default process group, and the device its tensors must live on.

Why one module: a backend serves tensors of some device types only. NCCL serves CUDA tensors, gloo
serves CPU tensors (its CUDA support covers broadcast and all_reduce only, so qft_ds treats gloo as a
CPU backend). A collective on a tensor of another device type fails on that backend alone: a CPU flag
passes every gloo test and breaks the first multi-GPU run. So here:
- before each collective, every tensor's device type is checked against the group's
  (`served_device_types`); a mismatch raises a clear error on any backend, gloo included;
- values that start on the host (flags, signal numbers) are put on `device()` by this module, never by
  its callers: `any_rank`, `max_over_ranks`;
- `all_reduce_mean_` moves a tensor the group does not serve to `device()` and back; the other
  collectives take device tensors only (the ZeRO hot path: a silent copy there would hide a bug).

The collectives go through `deepspeed.comm` when it adds something to the call: its comms logger or
profiler is on (a user's `"comms_logger"` setting then sees every call), or its backend is not
torch.distributed's. Otherwise they go straight to torch.distributed, on the same default group: with
its logger off deepspeed.comm only passes a call on, and that costs more Python than c10d's own launch
(bench/NOTES.md, issue 16; the fused flow makes one collective per weight). The group's timeout and
backend are the process group's, so they apply either way. Functions are looked up at call time, so
wrappers installed later (test spies, bench/zero.py's byte counter) see every call.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn); the GPU image's 2.11 has only those
_TORCH_NAMES = {"reduce_scatter_tensor": ("reduce_scatter_single", "reduce_scatter_tensor"),
                "all_gather_into_tensor": ("all_gather_single", "all_gather_into_tensor")}


# -- the group -------------------------------------------------------------------------------------
def is_initialized() -> bool:
    """A process group exists (of any size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_distributed() -> bool:
    """More than one rank: only then does a collective move anything."""
    return world_size() > 1


def served_device_types() -> tuple[str, ...]:
    """The device types the default group's backend takes tensors of, preferred first ("cpu" without a
    group). A backend string naming devices ("cuda:gloo", "cpu:gloo,cuda:nccl") is taken as written."""
    if not is_initialized():
        return ("cpu",)
    name = str(dist.get_backend())
    if ":" in name:
        return tuple(part.split(":")[0].strip() for part in name.split(","))
    if name == "gloo":
        return ("cpu",)  # gloo's CUDA support lacks reduce-scatter and all-gather
    caps = getattr(dist.Backend, "backend_capability", {}).get(name)
    if caps:
        return tuple(caps)
    acc = getattr(torch, "accelerator", None)  # an out-of-tree backend that did not declare its devices
    current = acc.current_accelerator() if acc is not None and acc.is_available() else None
    return (current.type,) if current is not None else ("cpu",)


def device(*tensors: torch.Tensor, types: tuple[str, ...] | None = None) -> torch.device:
    """The device collectives run on: that of the tensors at hand if the group serves it (a group serving
    several device types), else the group's preferred type (the current CUDA device under NCCL).
    `types`: served_device_types(), if the caller has it already."""
    types = types or served_device_types()
    if tensors and all(t.device.type in types for t in tensors) and len({t.device for t in tensors}) == 1:
        return tensors[0].device
    kind = types[0]
    if kind == "cpu":
        return torch.device("cpu")
    mod = getattr(torch, kind, None)
    return torch.device(kind, mod.current_device()) if hasattr(mod, "current_device") else torch.device(kind)


def _check(op: str, tensors, types: tuple[str, ...] | None = None) -> None:
    types = types or served_device_types()
    for t in tensors:
        if t.device.type not in types:
            raise RuntimeError(
                f"qft_ds.comm.{op}: a {t.device.type} tensor (shape {tuple(t.shape)}, {t.dtype}) cannot take part "
                f"in a collective of this process group: its backend {str(dist.get_backend())!r} serves "
                f"{' and '.join(types)} tensors only. Create or move it with qft_ds.comm.device().")


def _collective(name: str, *tensors: torch.Tensor, types: tuple[str, ...] | None = None, **kwargs):
    """Run the collective `name` after the device check (`types`: served_device_types(), if known)."""
    _check(name, tensors, types)
    return _function(name)(*tensors, **kwargs)


def _function(name: str):
    """deepspeed.comm's collective `name` where it adds something to the call, else torch.distributed's."""
    ds = sys.modules.get("deepspeed.comm")  # not imported: not initialised (importing it costs seconds)
    if ds is not None and ds.is_initialized() and _deepspeed_adds(ds):
        return getattr(ds, name)
    return next(getattr(dist, n) for n in _TORCH_NAMES.get(name, (name,)) if hasattr(dist, n))


def _deepspeed_adds(ds) -> bool:
    """deepspeed.comm logs or profiles collectives (its comms logger is on), or runs them on a backend of
    its own: only then does a call through it do more than torch.distributed's."""
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    return bool(ds.comms_logger.enabled) or type(backend).__name__ != "TorchBackend"


# -- host values -----------------------------------------------------------------------------------
def max_over_ranks(value: float) -> float:
    """The largest of every rank's `value` (a Python number), reduced on `device()`."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float32, device=device())
    _collective("all_reduce", t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any: ranks that must skip or stop together agree on it."""
    return max_over_ranks(1.0 if flag else 0.0) > 0.0


def finite_on_every_rank(t: torch.Tensor) -> bool:
    """False on every rank if `t` holds a NaN or inf on any rank (a non-finite loss skips the step on all
    of them, or they would drift apart): one host read, one flag reduced."""
    return not any_rank(not bool(torch.isfinite(t.detach()).all()))


def barrier() -> None:
    if is_distributed():
        _collective("barrier")


# -- tensors ---------------------------------------------------------------------------------------
def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks, reduced in fp32 (every rank then applies the same gradient).

    One rank: `t` itself, whatever its dtype (no copy). Otherwise an fp32 tensor on `t`'s device: `t`
    itself, reduced in place, if it is fp32 on a device the group serves; else a reduced fp32 copy, made
    on `device()` and brought back to `t`'s device (`t` is left as it was).
    """
    return all_reduce_mean_async(t).wait()


class PendingMean:
    """An all-reduce in flight: wait() gives the mean over ranks (in the reduce dtype, on the input's device)."""

    def __init__(self, work, buf: torch.Tensor, divide_by: int, back: torch.device):
        self.work, self.buf, self.divide_by, self.back = work, buf, divide_by, back

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()  # NCCL: the current stream waits for the collective's; no host block
            if self.divide_by != 1:
                self.buf /= self.divide_by
        return self.buf.to(self.back)


def all_reduce_mean_async(t: torch.Tensor, reduce_dtype: torch.dtype = torch.float32) -> PendingMean:
    """The mean of all_reduce_mean_ (which is this, waited for), started now and collected with .wait():
    data parallel's fused flow overlaps it with the next layer's backward. One rank: `t` itself, nothing
    launched.

    fp32 (default): a bf16/fp16 gradient over a power-of-two number of ranks is cast and divided in one
    kernel before the sum (prescaled_mean_exact says why that gives the same bits as dividing the sum);
    other inputs are cast, summed, then divided. bf16: half the bytes; each rank's g / world is exact in
    bf16 over 2**k ranks (bar subnormals) and the backend rounds the sum to bf16; the mean comes back bf16."""
    world = world_size()
    if world == 1:
        return PendingMean(None, t, 1, t.device)
    types = served_device_types()
    dev = device(t, types=types)
    if reduce_dtype == torch.bfloat16:
        exact = world & (world - 1) == 0
        buf = t.to(dev, torch.bfloat16) * (1.0 / world) if exact else t.to(dev, torch.bfloat16)
        divide_by = 1 if exact else world
    elif reduce_dtype != torch.float32:
        raise ValueError(f"all_reduce_mean_async reduces in fp32 or bf16, got {reduce_dtype}")
    elif t.dim() and prescaled_mean_exact(t.dtype, world):  # (a 0-d product would broadcast to 1-d)
        buf, divide_by = torch.mul(t.to(dev), _reciprocal(dev, world)), 1
    else:
        buf, divide_by = t.to(dev, torch.float32), world
    work = _collective("all_reduce", buf, types=types, async_op=True)
    return PendingMean(work, buf, divide_by, t.device)


def prescaled_mean_exact(dtype: torch.dtype, world: int) -> bool:
    """Whether sum(g_i / world) over ranks, in fp32, has the bits of sum(g_i) / world (the fp32 sum divided
    after it is reduced), whatever the order the backend adds in.

    True for bf16 and fp16 gradients over 2**k ranks, k <= 16: every g_i / 2**k is exact in fp32 (bf16's
    smallest magnitude is 2**-133, fp16's 2**-24: with k <= 16 all stay on fp32's grid, subnormals
    included), every partial sum is a multiple of 2**-(133 + k) (bf16) or 2**-(24 + k) (fp16), and
    scaling by 2**-k maps fp32's rounding of such numbers onto itself, so each addition rounds alike.
    The one difference: a sum that overflows fp32 unscaled (|sum| > 3.4e38) stays finite scaled.
    fp32 gradients are not: g / 2 of an fp32 subnormal can round."""
    return dtype in (torch.bfloat16, torch.float16) and world & (world - 1) == 0 and world <= 2 ** 16


_RECIPROCALS: dict = {}


def _reciprocal(dev: torch.device, world: int) -> torch.Tensor:
    """1/world as a one-element fp32 tensor on `dev`, made once: a bf16 tensor times it is computed and
    stored in fp32 (a Python scalar, or a 0-d tensor, would leave the product bf16)."""
    key = (dev, world)
    r = _RECIPROCALS.get(key)
    if r is None:
        r = _RECIPROCALS[key] = torch.full((1,), 1.0 / world, dtype=torch.float32, device=dev)
    return r


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns `t`."""
    if is_distributed():
        _collective("all_reduce", t)
    return t


def broadcast_from_rank0(tensors) -> None:
    """Make every rank's tensors rank 0's, in place (same shapes on every rank)."""
    if is_distributed():
        for t in tensors:
            _collective("broadcast", t, src=0)


class PendingSlice:
    """A reduce-scatter in flight: wait() gives (this rank's slice of the mean, the summed flag)."""

    def __init__(self, work, out: torch.Tensor, n: int, divide_by: int, flag=None):
        self.work, self.out, self.n, self.divide_by, self.flag = work, out, n, divide_by, flag

    def wait(self):
        if self.work is None:  # one rank: the slice and flag as given
            return self.out, self.flag
        self.work.wait()  # NCCL: the current stream waits for the collective's; no host block
        shard = self.out[:self.n]
        if self.divide_by != 1:
            shard.div_(self.divide_by)  # SUM then divide: gloo has no AVG; (g + g) / 2 == g
        return shard, self.out[-1]


def reduce_scatter_mean_async(flat: torch.Tensor, bounds, flag: torch.Tensor) -> PendingSlice:
    """Mean over ranks of a flat float tensor (reduced in fp32), as this rank's slice [lo, hi) of `bounds`,
    started now and collected with .wait(): the fused flow overlaps it with the next layer's backward.

    `flag` (a 0-d float) is summed over ranks and returned too: it rides in one extra element per rank,
    so every rank learns that some rank's gradient was non-finite without a second collective.
    """
    world, me = world_size(), rank()
    lo, hi = bounds[me]
    if world == 1:
        return PendingSlice(None, flat[lo:hi], hi - lo, 1, flag)
    width = max(b - a for a, b in bounds) + 1
    buf, divide_by = _pack_slices(flat, bounds, flag, width)
    out = torch.empty(width, dtype=torch.float32, device=flat.device)
    work = _collective("reduce_scatter_tensor", out, buf.view(-1), op=dist.ReduceOp.SUM, async_op=True)
    return PendingSlice(work, out, hi - lo, divide_by)


def _pack_slices(flat: torch.Tensor, bounds, flag: torch.Tensor, width: int):
    """Rank r's slice of `flat` in row r of an fp32 [world, width] buffer, the flag in each row's last
    element; and what the reduced slice is still to be divided by.

    Equal slices (the usual cut: whole units, evenly) are one strided copy for all rows, cast and, where
    prescaled_mean_exact, divided in the same kernel; the flags one fill. Uneven ones (a short last rank)
    are copied row by row into zeros. Either way the bits of the mean are those of the sum divided."""
    world = len(bounds)
    buf = torch.empty(world, width, dtype=torch.float32, device=flat.device)
    n = width - 1
    divide_by = world
    if flat.numel() == world * n and all((a, b) == (r * n, (r + 1) * n) for r, (a, b) in enumerate(bounds)):
        rows = flat.reshape(world, n)
        if prescaled_mean_exact(flat.dtype, world):
            torch.mul(rows, _reciprocal(flat.device, world), out=buf[:, :n])
            divide_by = 1
        else:
            buf[:, :n].copy_(rows)
    else:
        buf.zero_()
        for r, (a, b) in enumerate(bounds):
            buf[r, :b - a] = flat[a:b]
    buf[:, -1] = flag
    return buf, divide_by


def reduce_scatter_mean(flat: torch.Tensor, bounds, flag: torch.Tensor):
    """reduce_scatter_mean_async, waited for: (this rank's slice, the summed flag)."""
    return reduce_scatter_mean_async(flat, bounds, flag).wait()


def all_gather_bytes(mine: torch.Tensor) -> torch.Tensor:
    """uint8 [P] from every rank -> uint8 [world * P] in rank order."""
    return all_gather_bytes_async(mine).wait()


class PendingGather:
    """An all-gather in flight: wait() gives the gathered uint8 buffer. It keeps the rank's input alive
    until then (the collective reads it asynchronously)."""

    def __init__(self, work, out: torch.Tensor, mine: torch.Tensor):
        self.work, self.out, self.mine = work, out, mine

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()  # NCCL: the current stream waits for the collective's; no host block
            self.work = self.mine = None
        return self.out


def all_gather_bytes_async(mine: torch.Tensor) -> PendingGather:
    """all_gather_bytes started now and collected with .wait(): ZeRO-3 gathers the next weights while
    the current one is used. One rank: `mine` itself, nothing launched."""
    if world_size() == 1:
        return PendingGather(None, mine, mine)
    out = torch.empty(world_size() * mine.numel(), dtype=torch.uint8, device=mine.device)
    work = _collective("all_gather_into_tensor", out, mine, async_op=True)
    return PendingGather(work, out, mine)
