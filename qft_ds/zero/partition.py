"""Where each rank's shard of a quantized weight lies (pure arithmetic, no communication).

A HybridWeight's flat element range [0, numel) is cut at multiples of `unit = lcm(group, block)`:
no weight-scale group and no momentum block straddles two ranks. Each shard's groups and blocks are
therefore exactly the one-device ones, and a shard updated with `offset = global_offset + lo` draws the
one-device stochastic-rounding numbers (the counter-based RNG is keyed by the global element offset).
Ranks get whole units, as evenly as possible; the last rank takes the tail of a partial unit, and a
rank may get nothing when a weight has fewer units than ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shard_bounds(numel: int, unit: int, world: int) -> list[tuple[int, int]]:
    """[(lo, hi)] per rank: contiguous, in rank order, cut at multiples of `unit`, covering [0, numel)."""
    if numel < 0 or unit < 1 or world < 1:
        raise ValueError(f"shard_bounds: numel={numel}, unit={unit}, world={world}")
    units = -(-numel // unit)
    cuts = [min(r * units // world * unit, numel) for r in range(world + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def block_range(lo: int, hi: int, block: int) -> tuple[int, int]:
    """The scale indices of the blocks covering elements [lo, hi); lo is block-aligned."""
    return lo // block, -(-hi // block)


@dataclass(frozen=True)
class Partition:
    """One weight's split over `world` ranks, seen from `rank`."""
    numel: int
    group: int   # weight scale group (elements)
    block: int   # momentum / gradient-buffer block (elements)
    world: int
    rank: int

    @property
    def unit(self) -> int:
        return math.lcm(self.group, self.block)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.numel, self.unit, self.world)

    @property
    def lo(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def hi(self) -> int:
        return self.bounds[self.rank][1]

    def scale_bounds(self, block: int) -> list[tuple[int, int]]:
        """Per rank, its range of scale indices for blocks of `block` (group or momentum block)."""
        return [block_range(lo, hi, block) for lo, hi in self.bounds]


def outlier_bounds(outlier_idx: torch.Tensor, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per rank, the range of positions in the sorted outlier index list whose element it owns."""
    if outlier_idx.numel() == 0:
        return [(0, 0)] * len(bounds)
    edges = torch.tensor([hi for _, hi in bounds], dtype=torch.int64, device=outlier_idx.device)
    cuts = torch.searchsorted(outlier_idx.long(), edges).tolist()
    starts = [0, *cuts[:-1]]
    return list(zip(starts, cuts))
