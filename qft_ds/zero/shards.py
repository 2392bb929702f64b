"""One quantized weight's shard on this rank, and the lossless gathers of its int8 state.

Stages 1 and 2 keep the whole weight on every rank: the owner updates its slice [lo, hi) in place and
the slices are all-gathered (int8 codes, fp32 scales, fp32 outlier values: bit for bit). Stage 3 keeps
only the slice; the whole weight is gathered for each use (forward, backward) and freed after it.

A gather packs each rank's pieces into one byte buffer with one copy and unpacks the gathered one with one
copy (packing.py), so one all_gather moves a weight. The outlier indices only change when outliers are
re-selected, so stages 1 and 2 never send them. Stage 3's gathers go through a GatherPrefetcher
(prefetch.py), which starts the next weights' gathers while the current one is used.

Streaming conversion at stage 3 cuts each weight as soon as it is quantized (`preshard`): a rank never holds
the whole model's int8 state, and the WeightShard later adopts the cut it finds instead of making its own.
"""
from __future__ import annotations

import torch

from qft_ds import comm
from qft_ds.zero.packing import GatherLayout
from qft_ds.zero.partition import Partition, outlier_bounds


def _keep_residual_slice(w, lo: int, hi: int) -> None:
    if w.residual is not None and w.residual.numel() == w.numel:  # only the owner's slice is state
        w.residual = w.residual[lo:hi].clone()


def keep_slice(w, part: Partition, gather=None) -> list[tuple[int, int]]:
    """Replace the whole state now in `w` by rank `part.rank`'s slice (outlier indices stay those of the whole
    weight); returns every rank's range of positions in the sorted outlier list, which the gathers need."""
    o_bounds = outlier_bounds(w.outlier_idx, part.bounds)
    lo, hi = part.bounds[part.rank]
    (sa, sb), (oa, ob) = part.scale_bounds(w.group)[part.rank], o_bounds[part.rank]
    w.hold(w.codes[lo:hi].clone(), w.scales[sa:sb].clone(), w.outlier_idx[oa:ob].clone(),
           w.outlier_val[oa:ob].clone(), gather=gather)
    return o_bounds


def preshard(w, part: Partition) -> None:
    """Streaming conversion at stage 3: keep only this rank's slice of a weight just quantized (and of its
    error-feedback carry). The optimizer's WeightShard adopts it, if its Partition is the same."""
    _keep_residual_slice(w, *part.bounds[part.rank])
    w._qft_preshard = (part, keep_slice(w, part))


class WeightShard:
    def __init__(self, w, part: Partition, stage: int, prefetcher=None):
        if stage not in (1, 2, 3):
            raise ValueError(f"zero stage must be 1, 2 or 3, got {stage}")
        self.w, self.part, self.stage = w, part, stage
        self.prefetcher = prefetcher  # stage 3: serves each use's gather (prefetch.py); None: gathered then
        self._layouts = {}
        self.bounds = part.bounds
        self.lo, self.hi = self.bounds[part.rank]
        self.scale_bounds = part.scale_bounds(w.group)
        _keep_residual_slice(w, self.lo, self.hi)
        cut = w.__dict__.pop("_qft_preshard", None)
        if cut is None:
            self.reshard()
            return
        if stage != 3 or cut[0] != part:
            raise ValueError(f"a weight was sharded while converting as {cut[0]}, but the optimizer shards it as "
                             f"{part} at stage {stage}: convert with the run's ZeRO stage, world size and "
                             "qft.block_size")
        self.outlier_bounds = cut[1]
        w.hold(w.codes, w.scales, w.outlier_idx, w.outlier_val, gather=self.gather_full)
        self._local_idx = None

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    # -- layout ------------------------------------------------------------------------------------
    def reshard(self) -> None:
        """(Re)compute outlier ownership from the whole weight now in `w`; stage 3 then drops the rest.
        Called at setup and after outliers are re-selected (which rebuilds the whole weight)."""
        w = self.w
        if self.stage == 3:
            self.outlier_bounds = keep_slice(w, self.part, gather=self.gather_full)
        else:
            self.outlier_bounds = outlier_bounds(w.outlier_idx, self.bounds)
        self._local_idx = None
        self._layouts = {}  # the outlier counts per rank changed

    def codes(self) -> torch.Tensor:
        return self.w.codes if self.stage == 3 else self.w.codes[self.lo:self.hi]

    def scales(self) -> torch.Tensor:
        sa, sb = self.scale_bounds[self.part.rank]
        return self.w.scales if self.stage == 3 else self.w.scales[sa:sb]

    def outliers(self):
        """(indices local to the shard, values as a view into the weight's): the update writes them."""
        w = self.w
        oa, ob = self.outlier_bounds[self.part.rank]
        val = w.outlier_val if self.stage == 3 else w.outlier_val[oa:ob]
        if self._local_idx is None:
            idx = w.outlier_idx if self.stage == 3 else w.outlier_idx[oa:ob]
            self._local_idx = idx - self.lo
        return self._local_idx, val

    # -- gradients ---------------------------------------------------------------------------------
    def reduce_scatter(self, grad: torch.Tensor):
        """The mean gradient over ranks, this rank's slice (fp32), and whether every rank's was finite.
        A bf16 gradient is cast while it is packed: no fp32 copy of the whole layer's gradient."""
        return self.reduce_scatter_async(grad)()

    def reduce_scatter_async(self, grad: torch.Tensor):
        """reduce_scatter started now; call the result for (slice, finite) once it is needed."""
        flat = grad.reshape(-1)
        bad = (~torch.isfinite(flat.sum(dtype=torch.float32))).float()
        pending = comm.reduce_scatter_mean_async(flat, self.bounds, bad)

        def result():
            shard, bad_sum = pending.wait()
            return shard, bad_sum == 0
        return result

    # -- gathers -----------------------------------------------------------------------------------
    def _layout(self, with_idx: bool) -> GatherLayout:
        """The byte layout of a gather (cached until the outliers are re-selected): per rank, fp32 scales,
        fp32 outlier values, int32 outlier indices (with_idx: stage 3's whole-state gather), int8 codes."""
        cached = self._layouts.get(with_idx)
        if cached is None:
            rows = []
            for (lo, hi), (sa, sb), (oa, ob) in zip(self.bounds, self.scale_bounds, self.outlier_bounds):
                rows.append([4 * (sb - sa), 4 * (ob - oa)] + ([4 * (ob - oa)] if with_idx else []) + [hi - lo])
            cached = self._layouts[with_idx] = GatherLayout(rows)
        return cached

    def gather_update(self) -> None:
        """Stages 1/2, after the owner updated its slice: every rank gets every slice (lossless)."""
        if comm.world_size() == 1:
            return
        w = self.w
        layout = self._layout(with_idx=False)
        _, val = self.outliers()
        mine = layout.pack([self.scales(), val, self.codes()], self.part.rank)
        layout.unpack_into(comm.all_gather_bytes(mine), [w.scales, w.outlier_val, w.codes])

    def gather_full(self):
        """Stage 3: the whole (codes, scales, outlier_idx, outlier_val), fresh tensors for one use (views
        of one buffer), through the prefetcher when one is set."""
        if comm.world_size() == 1:
            w = self.w
            return w.codes, w.scales, w.outlier_idx, w.outlier_val
        if self.prefetcher is not None:
            return self.prefetcher.use(self)
        return self.finish_gather(self.start_gather())

    def start_gather(self):
        """Stage 3: this rank's slice packed and its all-gather started (a collective: every rank starts
        the same gathers in the same order)."""
        w = self.w
        mine = self._layout(with_idx=True).pack([w.scales, w.outlier_val, w.outlier_idx, w.codes], self.part.rank)
        return comm.all_gather_bytes_async(mine)

    def finish_gather(self, pending):
        """The whole state from a gather started by start_gather (waits for it)."""
        scales, vals, idx, codes = self._layout(with_idx=True).unpack(pending.wait())
        return codes.view(torch.int8), scales.view(torch.float32), idx.view(torch.int32), vals.view(torch.float32)
