"""A ZeRO gather's byte layout (qft_ds/zero/packing.py): lossless, aligned, and one copy to unpack whatever
the world size (the training step is host-bound: launches per gather matter)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qft_ds.zero.packing import ALIGN, GatherLayout


def _pieces(world: int, g: torch.Generator):
    """Per rank: fp32 scales, fp32 outlier values, int32 outlier indices, int8 codes, of uneven sizes
    (rank 1 holds no outliers; the last rank the shortest tail)."""
    out = []
    for r in range(world):
        n = 64 * (3 - r % 3) + (5 if r == world - 1 else 0)
        no = 0 if r == 1 else 3 + r
        out.append([torch.randn(-(-n // 32), generator=g), torch.randn(no, generator=g),
                    torch.randint(-2**31, 2**31 - 1, (no,), generator=g, dtype=torch.int32),
                    torch.randint(-128, 128, (n,), generator=g, dtype=torch.int8)])
    return out


def _layout(pieces) -> GatherLayout:
    return GatherLayout([[t.numel() * t.element_size() for t in row] for row in pieces])


def _gathered(layout, pieces):  # what all_gather gives: every rank's packed buffer in rank order
    return torch.cat([layout.pack(row, r) for r, row in enumerate(pieces)])


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_unpack_gives_every_rank_pieces_bit_for_bit(world):
    pieces = _pieces(world, torch.Generator().manual_seed(world))
    layout = _layout(pieces)
    gathered = _gathered(layout, pieces)
    assert gathered.numel() == world * layout.width and layout.width % ALIGN == 0
    regions = layout.unpack(gathered)
    base = regions[0].data_ptr()
    for kind, (region, dtype) in enumerate(zip(regions, (torch.float32, torch.float32, torch.int32, torch.int8))):
        whole = torch.cat([row[kind] for row in pieces])
        assert torch.equal(region.view(dtype), whole)  # bit for bit (NaN-free random values)
        assert (region.data_ptr() - base) % ALIGN == 0


def test_unpack_into_writes_the_whole_tensors_in_place():
    pieces = _pieces(3, torch.Generator().manual_seed(1))
    kinds = [0, 1, 3]  # stages 1/2 send no outlier indices
    rows = [[row[k] for k in kinds] for row in pieces]
    layout = _layout(rows)
    dests = [torch.zeros(sum(row[k].numel() for row in rows), dtype=rows[0][k].dtype) for k in range(3)]
    ptrs = [d.data_ptr() for d in dests]
    layout.unpack_into(_gathered(layout, rows), dests)
    for k, d in enumerate(dests):
        assert torch.equal(d, torch.cat([row[k] for row in rows])) and d.data_ptr() == ptrs[k]
    with pytest.raises(ValueError, match="destination must be contiguous and of that size"):
        layout.unpack_into(_gathered(layout, rows), [dests[0][:-1], dests[1], dests[2]])


@pytest.mark.parametrize("world", [2, 8])
def test_one_copy_to_pack_and_one_to_unpack_whatever_the_world_size(world):
    pieces = _pieces(world, torch.Generator().manual_seed(2))
    layout = _layout(pieces)
    gathered = _gathered(layout, pieces)
    layout.unpack(gathered)  # the padding zeros are made once per layout and device, not per gather
    with _Ops() as pack_ops:
        layout.pack(pieces[0], 0)
    with _Ops() as unpack_ops:
        layout.unpack(gathered)
    copies = ("cat", "copy_", "index_put_", "index_select", "slice_scatter")
    assert [n for n in pack_ops.names if n.split(".")[0] in copies] == ["cat.out"]
    assert [n for n in unpack_ops.names if n.split(".")[0] in copies] == ["cat.default"]
