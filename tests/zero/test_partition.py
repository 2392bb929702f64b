"""Shard bounds: whole weight groups and momentum blocks per rank, covering the weight, balanced."""
import math

import pytest
import torch

from qft_ds.zero.partition import Partition, outlier_bounds, shard_bounds


@pytest.mark.parametrize("numel,group,block,world", [(8192, 32, 64, 2), (576 * 1536, 96, 256, 3),
                                                     (1000, 128, 256, 2), (300, 64, 256, 4), (0, 64, 256, 2)])
def test_bounds_cover_the_weight_on_group_and_block_boundaries(numel, group, block, world):
    parts = [Partition(numel, group, block, world, r) for r in range(world)]
    bounds = parts[0].bounds
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))  # contiguous, rank order
    unit = math.lcm(group, block)
    for lo, hi in bounds:
        assert lo % group == 0 and lo % block == 0  # no group or block straddles two ranks
        assert hi == numel or hi % unit == 0
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= unit  # as even as whole units allow
    # each rank's scales are exactly the one-device scales of its elements
    for kind in (group, block):
        ranges = parts[0].scale_bounds(kind)
        assert ranges[0][0] == 0 and ranges[-1][1] == -(-numel // kind)
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
    assert [(p.lo, p.hi) for p in parts] == bounds


def test_fewer_units_than_ranks_leaves_ranks_empty():
    assert shard_bounds(100, 64, 4) == [(0, 0), (0, 64), (64, 64), (64, 100)]


def test_outlier_bounds_follow_element_ownership():
    idx = torch.tensor([0, 5, 63, 64, 200, 255], dtype=torch.int32)
    assert outlier_bounds(idx, [(0, 64), (64, 128), (128, 256)]) == [(0, 3), (3, 4), (4, 6)]
    assert outlier_bounds(torch.zeros(0, dtype=torch.int32), [(0, 64), (64, 128)]) == [(0, 0), (0, 0)]


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="shard_bounds"):
        shard_bounds(10, 0, 2)
