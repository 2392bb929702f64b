"""ZeRO stages 1, 2, 3 as a sharding strategy of QFTLion (the interface: qft_ds/optim/sharding.py).

Same QTensor layout, same backward hook, same Lion core and ops.lion_step as one device; only where the
gradient is reduced and which slice a rank updates change:
- every quantized weight is split into whole weight groups and momentum blocks (partition.py); each
  rank holds int8 momentum (and the error-feedback residual) for its slice only: ~1/N;
- fused flow: the layer's gradient is reduce-scattered inside backward (mean over ranks),
  asynchronously: it overlaps the next layer's backward and is applied at the next hook (or at step());
  the owner updates its slice with offset = global_offset + lo (the one-device random draws), and
  stages 1/2 all-gather the slices' int8 codes, fp32 scales and outlier values: lossless;
- stack flow (gradient accumulation): stage 1 keeps whole int8 buffers and reduce-scatters them at the
  boundary; stages 2/3 reduce-scatter every micro-batch's gradient and keep only the slice's buffer;
- stage 3 also keeps the weight itself sharded; it is gathered for each use (shards.py), the next
  weights' gathers in flight while one is used (prefetch.py).
Float parameters (norms, biases) stay replicated: DeepSpeed all-reduces their gradients as at stage 0.

The global gradient norm (clipping) is the replicated float part plus the sum over ranks of every
slice's squared norm: fused, one scalar all-reduce per weight (its clipping budget needs the whole
weight's norm, as on one device); stack, one per step. Their float summation order differs from one
device's.
"""
from __future__ import annotations

import math

import torch

from qft_ds import comm
from qft_ds.optim.sharding import Owned
from qft_ds.zero.partition import Partition
from qft_ds.zero.prefetch import PREFETCH_DEPTH, GatherPrefetcher
from qft_ds.zero.shards import WeightShard


class ZeroSharding:
    overlap_depth = 1  # each weight's reduce-scatter runs during the next weight's backward

    def __init__(self, stage: int, prefetch_depth: int = PREFETCH_DEPTH):
        if stage not in (1, 2, 3):
            raise ValueError(f"zero_optimization.stage must be 1, 2 or 3 for ZeRO sharding, got {stage}")
        self.stage = stage
        # stage 3's gathers, in flight ahead along the traced order of uses (0: each gathered at its use)
        self.prefetcher = GatherPrefetcher(prefetch_depth) if stage == 3 else None
        self.shards: dict[int, WeightShard] = {}
        # stages 2/3 keep only the slice's stack buffer: each micro-batch is reduce-scattered as it arrives
        self.reduce_on_push = self._slice_of_mean if stage >= 2 else None

    def shard(self, weights, block_size: int) -> None:
        """Split every quantized weight over the initialised process group (once, before momentum exists;
        world size 1 is allowed)."""
        if self.shards:
            raise RuntimeError("the optimizer's int8 state was already sharded (shard() runs once)")
        world, rank = comm.world_size(), comm.rank()
        for w in weights:
            self.shards[id(w)] = WeightShard(w, Partition(w.numel, w.group, block_size, world, rank), self.stage,
                                             self.prefetcher)

    def shard_of(self, w) -> WeightShard:
        sh = self.shards.get(id(w))
        if sh is None:
            raise RuntimeError("ZeRO: call the optimizer's shard() after torch.distributed is initialised, "
                               "before training")
        return sh

    def owned(self, w) -> Owned:
        sh = self.shard_of(w)
        idx, val = sh.outliers()
        return Owned(sh.codes(), sh.scales(), idx, val, w.residual, w.global_offset + sh.lo, sh.lo, sh.hi)

    def owned_range(self, w) -> tuple[int, int]:
        sh = self.shard_of(w)
        return sh.lo, sh.hi

    def reduce(self, w, grad: torch.Tensor):
        return self.shard_of(w).reduce_scatter_async(grad)

    def grad_norm(self, grad: torch.Tensor, finite) -> torch.Tensor:
        """The whole weight's gradient norm from this rank's slice: the squares summed over ranks. `finite`
        is the same on every rank (the flag was summed in the reduce-scatter): a weight with a non-finite
        gradient anywhere gets a NaN norm and is written by nobody, as on one device."""
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square().reshape(1)
        norm = comm.all_reduce_sum(sq).sqrt().reshape(())
        return torch.where(finite, norm, torch.full_like(norm, math.nan))

    def after_update(self, w) -> None:
        if self.stage < 3:
            self.shard_of(w).gather_update()
        else:
            self.prefetcher.forget(self.shard_of(w))  # a gather of it started before the update is stale

    def reshard(self, w) -> None:
        sh = self.shard_of(w)
        if self.prefetcher is not None:
            self.prefetcher.forget(sh)
        sh.reshard()

    def end_step(self) -> None:
        """After each optimizer step (every rank): stage 3's prefetch trace ends there."""
        if self.prefetcher is not None:
            self.prefetcher.end_step()

    def _slice_of_mean(self, w, grad: torch.Tensor) -> torch.Tensor:
        return self.shard_of(w).reduce_scatter(grad.float())[0]

    def reduce_stacked(self, flow):
        """The stacked buffers become this rank's slices (stage 1 reduce-scatters whole buffers now); their
        squared norm is summed over ranks (every rank reaches this with the same weights)."""
        if self.reduce_on_push is None:
            flow.map_buffers(self._slice_of_mean)
        sq = flow.stacked_sq_norm()
        return None if sq is None else comm.all_reduce_sum(sq.reshape(1).float()).reshape(())

    def describe(self) -> dict:
        return {"zero_stage": self.stage, "world_size": comm.world_size()}
