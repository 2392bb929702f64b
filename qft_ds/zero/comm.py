"""The collectives of qft_ds's ZeRO: reduce-scatter (mean), all-gather of bytes, all-reduce (sum).

They call torch.distributed on its default process group: that is the group deepspeed.comm creates and
wraps (gloo on the CPU, NCCL on GPUs), and calling it directly lets the tests run 2 ranks without
DeepSpeed. Gloo has had reduce_scatter since torch 2.x (checked on 2.13), so both backends use the
real reduce-scatter and all-gather; there is no fallback path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn); the GPU image's 2.11 has only those
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class PendingSlice:
    """A reduce-scatter in flight: wait() gives (this rank's slice of the mean, the summed flag)."""

    def __init__(self, work, out: torch.Tensor, n: int, world: int, flag=None):
        self.work, self.out, self.n, self.world, self.flag = work, out, n, world, flag

    def wait(self):
        if self.work is not None:
            self.work.wait()  # NCCL: the current stream waits for the collective's; no host block
        if self.world == 1:
            return self.out, self.flag
        shard = self.out[:self.n].div_(self.world)  # SUM then divide: gloo has no AVG; (g + g) / 2 == g
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
    buf = torch.zeros(world, width, dtype=torch.float32, device=flat.device)
    for r, (a, b) in enumerate(bounds):
        buf[r, :b - a] = flat[a:b]
        buf[r, -1] = flag
    out = torch.empty(width, dtype=torch.float32, device=flat.device)
    work = _reduce_scatter(out, buf.view(-1), op=dist.ReduceOp.SUM, async_op=True)
    return PendingSlice(work, out, hi - lo, world)


def reduce_scatter_mean(flat: torch.Tensor, bounds, flag: torch.Tensor):
    """reduce_scatter_mean_async, waited for: (this rank's slice, the summed flag)."""
    return reduce_scatter_mean_async(flat, bounds, flag).wait()


def all_gather_bytes(mine: torch.Tensor) -> torch.Tensor:
    """uint8 [P] from every rank -> uint8 [world * P] in rank order."""
    world = world_size()
    if world == 1:
        return mine
    out = torch.empty(world * mine.numel(), dtype=torch.uint8, device=mine.device)
    _all_gather(out, mine)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_from_rank0(tensors) -> None:
    """Make every rank's tensors rank 0's, in place (same shapes on every rank)."""
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=0)
