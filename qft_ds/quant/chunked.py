"""Quantizing one big weight in row chunks: its transient memory is a few chunks, not a few copies of it.

A Llama-3 vocabulary's [128256, 4096] head is 525M elements: whole-tensor fp32 temporaries (a clone, |w| for
torch.topk, quantize_blockwise's own) cost ~12 bytes per element, 6.4 GiB beside its 0.98 GiB bf16 input, and
set the 8B benchmark's set-up peak (issue 15). Here every temporary is of one chunk of rows (CHUNK_ELEMENTS).

- Outliers: the top k of |w| per segment, found exactly by a radix select on the fp32 bit patterns of |w|
  (non-negative floats order as their int32 bits): histogram passes over the chunks (the high 15 bits, then
  the low 16 unless the weight is bf16) fix the k-th largest value T and how many exceed it; a last pass
  keeps every element above T and, of those equal to T, the first ones in index order. With no tie at T this is the set torch.topk returns; with ties it is a set of
  the same size with the same threshold (torch.topk's choice among ties is unspecified anyway).
- Dense codes: groups tile the flat layout and chunks start on group boundaries, so quantizing chunk by
  chunk is the whole-tensor quantize_blockwise bit for bit.
"""
from __future__ import annotations

import math

import torch

from qft_ds.ops import reference as ref

CHUNK_ELEMENTS = 1 << 23  # 32 MiB of fp32 per temporary; ~63 chunks for a 128k-vocabulary head
_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16  # |w|'s fp32 bits: 15 high (sign is 0), then 16 low


def quantize_hybrid(weight: torch.Tensor, group: int, outlier_frac: float, segments: list[int],
                    chunk_elements: int | None = None):
    """2-D weight -> (int8 codes [numel], fp32 scales [nblocks], sorted int32 outlier flat indices, their fp32
    values): the top `outlier_frac` of |w| of each segment of rows (k = round(frac * its elements)) kept
    exact, codes 0 there, the dense scales computed without them. A meta weight gives meta tensors.
    `chunk_elements`: elements per chunk of rows (default CHUNK_ELEMENTS, read at the call)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    rows, cols = weight.shape
    n = rows * cols
    if n >= 2 ** 31:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has {n} elements: outlier indices are int32 "
                         "(at most 2**31 - 1); split it")
    ks = [int(round(outlier_frac * r * cols)) for r in segments]
    if weight.is_meta:  # a skeleton's weight: the shapes only (streaming conversion reports it)
        meta = dict(device=weight.device)
        return (torch.empty(n, dtype=torch.int8, **meta), torch.empty(ref.num_blocks(n, group), **meta),
                torch.empty(sum(ks), dtype=torch.int32, **meta), torch.empty(sum(ks), **meta))
    idx, start = [], 0
    for r, k in zip(segments, ks):
        if k > 0:
            idx.append(top_magnitude(weight, start, start + r, k, chunk_elements))
        start += r
    if idx:
        idx = torch.cat(idx)
        val = weight[idx // cols, idx % cols].float()
        idx = idx.to(torch.int32)
    else:
        idx = torch.zeros(0, dtype=torch.int32, device=weight.device)
        val = torch.zeros(0, dtype=torch.float32, device=weight.device)
    codes, scales = quantize_dense(weight, group, idx, chunk_elements)
    return codes, scales, idx, val


def row_chunks(r0: int, r1: int, cols: int, chunk_elements: int, align: int = 1):
    """(first, end) row ranges covering [r0, r1), each about chunk_elements, a multiple of `align` rows."""
    step = max(align, chunk_elements // cols // align * align)
    for a in range(r0, r1, step):
        yield a, min(a + step, r1)


def _bits(weight: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """|w| of rows [a, b) as int32 bit patterns, flat: ordered as the values (NaN above inf, as in topk)."""
    return weight[a:b].reshape(-1).to(torch.float32, copy=True).abs_().view(torch.int32)


def _kth_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(the highest bin b with at least k elements in bins >= b, the count in bins > b)."""
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = elements in bins >= b
    b = int((above >= k).nonzero().max())
    return b, int(above[b + 1]) if b + 1 < len(counts) else 0


def top_magnitude(weight: torch.Tensor, r0: int, r1: int, k: int, chunk_elements: int):
    """Sorted int64 flat indices (into the whole 2-D weight) of the k largest |w| in rows [r0, r1); of the
    elements tied at the k-th value, the first in index order."""
    cols = weight.shape[1]
    chunks = list(row_chunks(r0, r1, cols, chunk_elements))
    dev = weight.device
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64, device=dev)
    for a, b in chunks:
        high += torch.bincount(_bits(weight, a, b) >> 16, minlength=_HIGH_BINS)
    b_high, above_high = _kth_bin(high, k)
    b_low, above_low = 0, 0  # bf16 -> fp32 leaves the low 16 bits 0: the high bin is the threshold
    if weight.dtype != torch.bfloat16:
        low = torch.zeros(_LOW_BINS, dtype=torch.int64, device=dev)
        for a, b in chunks:
            bits = _bits(weight, a, b)
            low += torch.bincount(bits[(bits >> 16) == b_high] & 0xFFFF, minlength=_LOW_BINS)
        b_low, above_low = _kth_bin(low, k - above_high)
    threshold = (b_high << 16) | b_low
    ties_left = k - above_high - above_low  # elements equal to the threshold still to take, >= 1
    picked = []
    for a, b in chunks:
        bits = _bits(weight, a, b)
        keep = bits > threshold
        if ties_left:
            tied = (bits == threshold).nonzero().squeeze(1)[:ties_left]
            keep[tied] = True
            ties_left -= len(tied)
        picked.append(keep.nonzero().squeeze(1) + a * cols)  # nonzero is in index order: sorted
    idx = torch.cat(picked)
    if len(idx) != k:  # the histograms and this pass read the same bits: a mismatch is a bug, not data
        raise RuntimeError(f"top_magnitude picked {len(idx)} of rows [{r0}, {r1}), expected {k}")
    return idx


def quantize_dense(weight: torch.Tensor, group: int, outlier_idx: torch.Tensor, chunk_elements: int):
    """The dense part: round-to-nearest blockwise int8 of the flat weight with the outliers (sorted flat
    indices) set to 0, chunk by chunk; chunks start on group boundaries, so the result is the whole-tensor
    quantize_blockwise's bit for bit."""
    rows, cols = weight.shape
    n = rows * cols
    codes = torch.empty(n, dtype=torch.int8, device=weight.device)
    scales = torch.empty(ref.num_blocks(n, group), dtype=torch.float32, device=weight.device)
    align = group // math.gcd(cols, group)  # rows per whole number of groups (1 when group divides cols)
    for a, b in row_chunks(0, rows, cols, chunk_elements, align):
        start, end = a * cols, b * cols
        x = weight[a:b].reshape(-1).to(torch.float32, copy=True)
        lo, hi = torch.searchsorted(outlier_idx, torch.tensor([start, end], device=weight.device,
                                                              dtype=outlier_idx.dtype)).tolist()
        x[outlier_idx[lo:hi].long() - start] = 0.0
        c, s = ref.quantize_blockwise(x, group, "rtn")
        codes[start:end] = c
        scales[start // group: ref.num_blocks(end, group)] = s
    return codes, scales
