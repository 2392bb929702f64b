"""The hybrid weight quantizer: dense symmetric int8 per group of input columns + sparse fp32 outliers.

The top `outlier_frac` of |w| are kept exact in fp32 with sorted int32 flat indices; their dense
codes are 0, and the dense scales are computed without them so the int8 step stays small. Outliers
are fp32, not bf16: a bf16 value near 0.5 has a step of 2e-3 and would never move at lr 2e-5.
"""
from __future__ import annotations

import torch
from torch import nn

from qft_ds import ops
from qft_ds.ops import reference as ref
from qft_ds.quant.chunked import quantize_hybrid
from qft_ds.quant.qtensor import QTensor


def choose_group(cols: int, group_size: int) -> int:
    """Largest divisor of the row length <= group_size, so groups tile each row exactly.

    If the best divisor is under half of group_size (an awkward width), groups of group_size run
    across row ends instead: still a valid flat block layout, just less local.
    """
    if cols <= group_size:
        return cols
    best = max(d for d in range(1, group_size + 1) if cols % d == 0)
    return best if 2 * best >= group_size else group_size


class HybridWeight(nn.Module):
    """A quantized 2-D weight: one instance is shared by every module that uses it (tied weights).

    Buffers move with `.to()`; `anchor` is an empty trainable Parameter that makes autograd run the
    quantized modules' backward and that the optimizer keys its state on.
    """

    def __init__(self, weight: torch.Tensor, group_size: int = 128, outlier_frac: float = 0.01,
                 global_offset: int = 0, segments: list[int] | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"HybridWeight expects a 2-D weight, got shape {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        self.group = choose_group(self.shape[1], group_size)
        self.global_offset = global_offset
        # row counts of stacked weights (fused projections): outliers are chosen per segment, so each
        # projection keeps its own top outlier_frac, as it would unfused
        self.segments = list(segments) if segments is not None else [self.shape[0]]
        if sum(self.segments) != self.shape[0]:
            raise ValueError(f"segments {self.segments} do not add up to the {self.shape[0]} rows")
        self.n_uses = 0  # modules that read this weight; set by conversion
        # in row chunks: a 128k vocabulary's head would otherwise make ~6 GiB of fp32 temporaries (issue 15)
        codes, scales, idx, val = quantize_hybrid(weight.detach(), self.group, outlier_frac, self.segments)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("outlier_idx", idx)
        self.register_buffer("outlier_val", val)
        self.anchor = nn.Parameter(torch.empty(0, device=weight.device))
        self.anchor._qft_weight = self
        # int8 error-feedback carry (units of scale/254), set when rounding == 'ef'
        self.register_buffer("residual", None)
        self.grad = None      # dense fp32 gradient, only when no optimizer consumes it (inspection)
        self._gather = None   # ZeRO-3: gives the whole state when this rank holds a slice (hold)

    def start_carry(self, weight: torch.Tensor | None = None) -> None:
        """Error feedback's int8 carry (units of scale/254) at the start of training. From the
        full-precision `weight` these codes were rounded from: what rounding dropped, stochastically
        rounded. A carry of zero would put every weight at the centre of its rounding cell, and its
        forward code would not move until the updates summed to half an int8 step (about 150 steps at
        lr 1e-5 on SmolLM2, whose median step is 3.5e-3): EF then barely learned at low lr where SR did.
        Without `weight` (a model converted without EF), the position in the cell is unknown: a uniform
        draw, keyed by the global element offset, is right on average."""
        n = self.numel
        key = ref.rng_key(0, 0, ref.STREAM_CARRY)
        if weight is None:
            u = ref.uniform(key, self.global_offset, n, self.codes.device)
            self.residual = (u * 255).floor_().sub_(127).clamp_(-ref.QMAX, ref.QMAX).to(torch.int8)
            return
        flat = weight.detach().reshape(-1).float().to(self.codes.device)
        inv = torch.where(self.scales > 0, 1.0 / self.scales, torch.zeros_like(self.scales))
        y = (ref._blocks(flat, self.group) * inv[:, None]).reshape(-1)[:n]
        r = (y - self.codes.float()).mul_(254.0)
        r[self.outlier_idx.long()] = 0.0  # outliers are exact: no carry
        self.residual = ref.round_codes(r, "sr", key, self.global_offset)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]  # of the whole weight, also when ZeRO-3 holds a shard here

    @property
    def qtensor(self) -> QTensor:
        return QTensor(self.codes, self.scales, self.group, self.shape)

    def full_state(self):
        """(codes, scales, outlier_idx, outlier_val) of the whole weight. Under ZeRO-3 this rank holds a
        shard: they are gathered from every rank for this one use and freed after it (qft_ds.zero)."""
        if self._gather is not None:
            return self._gather()
        return self.codes, self.scales, self.outlier_idx, self.outlier_val

    def hold(self, codes, scales, outlier_idx, outlier_val, gather=None) -> None:
        """Replace the state: the whole weight, or (ZeRO-3, `gather` given) this rank's slice, outlier
        indices still those of the whole weight, with gather() giving the whole state for each use."""
        self.codes, self.scales, self.outlier_idx, self.outlier_val = codes, scales, outlier_idx, outlier_val
        self._gather = gather

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        codes, scales, outlier_idx, outlier_val = self.full_state()
        w = ops.current(codes.device).dequantize_hybrid(codes, scales, self.group, outlier_idx, outlier_val, dtype)
        return w.view(self.shape)

    def dequantize_rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """fp32 rows `ids` (any shape) -> [*ids.shape, cols]: an embedding lookup that never dequantizes
        the whole table (LLaMA-7B's is 131M params: 0.5 GB in fp32 for a few hundred rows)."""
        rows, cols = self.shape
        if self.group > cols or cols % self.group:  # groups run across rows: no row-local layout
            return torch.nn.functional.embedding(ids, self.dequantize(dtype))
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        all_codes, scales, outlier_idx, outlier_val = self.full_state()
        codes = all_codes.view(rows, cols)[uniq].float().view(len(uniq), -1, self.group)
        dense = (codes * scales.view(rows, -1)[uniq][..., None]).view(len(uniq), cols)
        if outlier_idx.numel():
            o_row = outlier_idx.long() // cols
            hit = torch.isin(o_row, uniq)
            pos = torch.searchsorted(uniq, o_row[hit])
            dense[pos, outlier_idx[hit].long() % cols] = outlier_val[hit]
        return dense.to(dtype)[inverse].view(*ids.shape, cols)

    def refresh_outliers(self, outlier_frac: float) -> None:
        """Re-select outliers from the current weights (costs one RTN re-rounding of the tensor)."""
        fresh = HybridWeight(self.dequantize(), self.group, outlier_frac, self.global_offset, self.segments)
        self.hold(fresh.codes, fresh.scales, fresh.outlier_idx, fresh.outlier_val)  # whole (ZeRO reshards it)
        if self.residual is not None:
            self.residual.zero_()

    def state_nbytes(self) -> int:
        """Bytes of model state held by this weight (codes, scales, outliers, EF residual)."""
        n = sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.outlier_idx,
                                                        self.outlier_val))
        return n + (self.residual.numel() if self.residual is not None else 0)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, group={self.group}, outliers={self.outlier_idx.numel()}, "
                f"uses={self.n_uses}")

