"""The CPU reference's Lion step run over slices of a big weight, for benchmarks that
run big shapes' weights on the CPU (bench/peak_composition.py: a 128k x 4096 LM head).

The reference step makes several fp32 temporaries of the whole weight (on 525M elements: ~15 GB), which
the GPU kernel never makes. It is elementwise over flat, block-aligned state, with random draws keyed by
the global element offset, so running it slice by slice (slices a multiple of every block, the outliers
split by their sorted flat indices) gives the same bits as one call, as ZeRO's shards do
(tests/bench/test_sliced_ops.py checks it).
"""
from __future__ import annotations

import math

import torch


def _ranges(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def _outliers(idx, val, lo: int, hi: int):
    """The outliers in flat [lo, hi), indices made relative to lo (val a view: updates write through)."""
    if idx is None or not idx.numel():
        return idx, val
    a, b = (int(torch.searchsorted(idx, torch.tensor(v, dtype=idx.dtype))) for v in (lo, hi))
    return idx[a:b] - lo, val[a:b]


def sliced_lion_step(lion_step, slice_elems: int):
    def run(w_codes, w_scales, w_block, m_codes, m_scales, m_block, grad, *, offset, outlier_idx=None,
            outlier_val=None, residual=None, momentum_bits=8, **kw):
        n = w_codes.numel()
        unit = math.lcm(w_block, m_block, 2)  # whole weight groups, momentum blocks and int4 byte pairs
        size = max(unit, slice_elems // unit * unit)
        if n <= size:
            return lion_step(w_codes, w_scales, w_block, m_codes, m_scales, m_block, grad, offset=offset,
                             outlier_idx=outlier_idx, outlier_val=outlier_val, residual=residual,
                             momentum_bits=momentum_bits, **kw)
        wc, g = w_codes.reshape(-1), grad.reshape(-1)
        per_byte = 8 // momentum_bits
        for lo, hi in _ranges(n, size):
            idx, val = _outliers(outlier_idx, outlier_val, lo, hi)
            lion_step(wc[lo:hi], w_scales[lo // w_block: -(-hi // w_block)], w_block,
                      m_codes[lo // per_byte: -(-hi // per_byte)], m_scales[lo // m_block: -(-hi // m_block)],
                      m_block, g[lo:hi], offset=offset + lo, outlier_idx=idx, outlier_val=val,
                      residual=None if residual is None else residual.reshape(-1)[lo:hi],
                      momentum_bits=momentum_bits, **kw)
    return run


def install(table, slice_elems: int = 1 << 24) -> None:
    """Replace `table`'s (an op table of qft_ds.ops) lion_step by its sliced run."""
    if getattr(table, "_sliced", False):
        return
    table.lion_step = sliced_lion_step(table.lion_step, slice_elems)
    table._sliced = True
