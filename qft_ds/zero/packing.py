"""The byte layout of one weight's all-gather: a rank's pieces packed with one copy, the gathered buffer
unpacked with one copy per kind of tensor (or one in all), whatever the world size.

A weight's state is a few kinds of 1-D tensors (fp32 scales, fp32 outlier values, int32 outlier indices,
int8 codes); each rank holds one contiguous piece of each kind, and the pieces of a kind tile the whole
tensor in rank order. Each rank sends its pieces back to back as bytes (4-byte kinds first), padded to one
width for all ranks, so one all_gather moves the weight. The step is host-bound (bench/NOTES.md): the
copies are one `torch.cat` each, never a Python loop of copies over ranks or kinds. Lossless: bytes only.
"""
from __future__ import annotations

import torch

# region starts in an unpacked buffer are multiples of this: a kernel reading codes or scales from a
# region gets an aligned pointer (Triton vectorises loads of 16-byte-aligned pointers only)
ALIGN = 16


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


class GatherLayout:
    """`nbytes[r][k]`: the bytes of rank r's piece of kind k (the same kinds, in the same order, on every
    rank). Every rank computes the same layout from the partition, so no sizes are exchanged."""

    def __init__(self, nbytes: list[list[int]]):
        self.kinds = len(nbytes[0])
        used = [sum(row) for row in nbytes]
        self.width = -(-max(used) // ALIGN) * ALIGN
        self._used = used
        # the gathered buffer splits into, per rank: its kinds' pieces, then its padding
        self.splits = [s for row, u in zip(nbytes, used) for s in (*row, self.width - u)]
        self.totals = [sum(row[k] for row in nbytes) for k in range(self.kinds)]
        self.pads = [(-t) % ALIGN for t in self.totals]
        self._zeros = {}  # device -> ALIGN zero bytes: the padding between unpacked regions

    def pack(self, pieces, rank: int) -> torch.Tensor:
        """Rank `rank`'s pieces as one uint8 [width] buffer (one copy). The padding after them is left
        unwritten: no rank reads it (the layout says where every piece ends)."""
        if len(pieces) != self.kinds:
            raise ValueError(f"a gather packs {self.kinds} kinds of pieces, got {len(pieces)}")
        dev = pieces[0].device
        mine = torch.empty(self.width, dtype=torch.uint8, device=dev)
        torch.cat([as_bytes(t) for t in pieces], out=mine[:self._used[rank]])
        return mine

    def pieces(self, gathered: torch.Tensor) -> list[list[torch.Tensor]]:
        """Views of the gathered uint8 [world * width] buffer: per kind, every rank's piece in rank order."""
        parts = gathered.split(self.splits)
        step = self.kinds + 1
        return [list(parts[k::step]) for k in range(self.kinds)]

    def unpack(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """The whole tensor of each kind, as uint8 regions of one new buffer (one copy): view each as its
        dtype. Each region starts on an ALIGN-byte boundary."""
        dev = gathered.device
        zeros = self._zeros.get(dev)
        if zeros is None:
            zeros = self._zeros[dev] = torch.zeros(ALIGN, dtype=torch.uint8, device=dev)
        seq, sizes = [], []
        for parts, total, pad in zip(self.pieces(gathered), self.totals, self.pads):
            seq += parts
            if pad:
                seq.append(zeros[:pad])
            sizes += [total, pad]
        return list(torch.cat(seq).split(sizes)[0::2])

    def unpack_into(self, gathered: torch.Tensor, dests) -> None:
        """Write every rank's pieces into the whole tensors `dests` (one per kind, contiguous, in place):
        one copy per kind. The own rank's piece is written too, with the bytes it sent."""
        for parts, dest, total in zip(self.pieces(gathered), dests, self.totals):
            if not dest.is_contiguous() or dest.numel() * dest.element_size() != total:
                raise ValueError(f"unpack_into writes {total} bytes in place: the {tuple(dest.shape)} {dest.dtype} "
                                 "destination must be contiguous and of that size")
            torch.cat(parts, out=dest.view(-1).view(torch.uint8))
