"""QTensor: the one integer state representation of qft_ds.

A QTensor is flat int8 codes plus one fp32 scale per block of `block` consecutive elements of the
flat (row-major) layout. The layout is fixed by the full tensor, never by how it is split: a shard is
a whole number of blocks, so 1 rank and N ranks hold the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qft_ds.ops import reference as ref


@dataclass
class QTensor:
    codes: torch.Tensor   # int8 [numel]
    scales: torch.Tensor  # fp32 [ceil(numel / block)]
    block: int
    shape: tuple

    @classmethod
    def quantize(cls, x: torch.Tensor, block: int, rounding: str = "rtn", key=None, offset=0):
        codes, scales = ref.quantize_blockwise(x, block, rounding, key, offset)
        return cls(codes, scales, block, tuple(x.shape))

    @classmethod
    def zeros(cls, shape, block: int, device=None):
        numel = 1
        for d in shape:
            numel *= d
        return cls(torch.zeros(numel, dtype=torch.int8, device=device),
                   torch.zeros(ref.num_blocks(numel, block), dtype=torch.float32, device=device),
                   block, tuple(shape))

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return ref.dequantize_blockwise(self.codes, self.scales, self.block, dtype).view(self.shape)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def shard(self, first_block: int, last_block: int) -> "QTensor":
        """Blocks [first_block, last_block) as a flat QTensor view sharing storage."""
        lo, hi = first_block * self.block, min(last_block * self.block, self.numel)
        return QTensor(self.codes[lo:hi], self.scales[first_block:last_block], self.block, (hi - lo,))
