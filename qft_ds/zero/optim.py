"""ZeroLion: QFTLion with its int8 state sharded over data-parallel ranks (ZeRO stages 1, 2, 3).

Same QTensor layout, same backward hook (GradientFlow), same ops.lion_step as one device; only where
the gradient is reduced and which slice a rank updates change:
- every quantized weight is split into whole weight groups and momentum blocks (zero/partition.py);
  each rank holds int8 momentum (and the error-feedback residual) for its slice only: ~1/N;
- fused flow: the layer's gradient is reduce-scattered inside backward (mean over ranks), asynchronously:
  it overlaps the next layer's backward and is applied at the next hook (or at step()); the owner
  updates its slice with offset = global_offset + lo (the one-device random draws), and stages 1/2
  all-gather the slices' int8 codes, fp32 scales and outlier values: lossless;
- stack flow (gradient accumulation): stage 1 keeps whole int8 buffers and reduce-scatters them at the
  boundary; stages 2/3 reduce-scatter every micro-batch's gradient and keep only the slice's buffer;
- stage 3 also keeps the weight itself sharded; HybridWeight gathers it for each use (zero/shards.py).
Float parameters (norms, biases) stay replicated: DeepSpeed all-reduces their gradients as at stage 0.

The global gradient norm (clipping) is the replicated float part plus the sum over ranks of every
slice's squared norm: fused, one scalar all-reduce per weight (its clipping budget needs the whole
weight's norm, as on one device); stack, one per step. Their float summation order differs from one
device's.
"""
from __future__ import annotations

import math

import torch

from qft_ds.flow import GradientFlow
from qft_ds.optim.lion import QFTLion
from qft_ds.quant.qtensor import QTensor
from qft_ds import comm
from qft_ds.zero.partition import Partition
from qft_ds.zero.shards import WeightShard


class ShardedFlow(GradientFlow):
    """GradientFlow whose stack buffers end up holding this rank's slice only.

    `per_push` (stages 2/3): each micro-batch's gradient is reduce-scattered as it arrives and only the
    slice is accumulated (int8). Otherwise (stage 1) whole buffers are accumulated and
    `scatter_buffers()` reduce-scatters them at the boundary. Fused mode behaves as GradientFlow.
    """

    def __init__(self, mode, apply_fn, block_size, shard_of, per_push: bool):
        super().__init__(mode, apply_fn, block_size)
        self.shard_of, self.per_push = shard_of, per_push

    def push(self, weight, grad: torch.Tensor, uses: int = 1) -> None:
        if self.mode == "stack" and self.per_push:
            bad = ~torch.isfinite(grad.sum())  # this rank's; QFTLion.step asks every rank
            self._bad = bad if self._bad is None else self._bad | bad
            grad = grad.float().nan_to_num_(0.0, 0.0, 0.0)  # never poison the other ranks' slices
            grad, _ = self.shard_of(weight).reduce_scatter(grad)
        super().push(weight, grad, uses)

    def scatter_buffers(self) -> None:
        """Whole int8 buffers -> this rank's slice of their mean over ranks (stage 1, at the boundary)."""
        if self.per_push:
            return
        for w in self._stack:
            shard, _ = self.shard_of(w).reduce_scatter(self._buffers[w].dequantize().reshape(-1))
            # a slice starts on a block boundary: its blocks are the whole buffer's blocks
            self._buffers[w] = QTensor.quantize(shard, self.block_size, "rtn")


class ZeroLion(QFTLion):
    def __init__(self, params, *, zero_stage: int, **kwargs):
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_optimization.stage must be 1, 2 or 3 for ZeroLion, got {zero_stage}")
        super().__init__(params, **kwargs)
        self.zero_stage = zero_stage
        self.shards: dict[int, WeightShard] = {}
        self._sq_shard = None  # this step's squared norm of this rank's gradient slices
        self._pending = None   # fused: (weight, its reduce-scatter in flight)
        self.flow = ShardedFlow(self.flow.mode, self._apply, self.block_size, self.shard_of,
                                per_push=zero_stage >= 2)
        self.flow.attach(self.weights)

    def shard(self) -> None:
        """Split every quantized weight over the initialised process group (call once, after
        torch.distributed is up and before the first step; world size 1 is allowed)."""
        if self.shards:
            raise RuntimeError("ZeroLion.shard() was already called")
        if any(self.state.get(w.anchor) for w in self.weights):
            raise RuntimeError("ZeroLion.shard() must run before momentum exists (before init_state/step)")
        world, rank = comm.world_size(), comm.rank()
        for w in self.weights:
            part = Partition(w.numel, w.group, self.block_size, world, rank)
            self.shards[id(w)] = WeightShard(w, part, self.zero_stage)

    def shard_of(self, w) -> WeightShard:
        sh = self.shards.get(id(w))
        if sh is None:
            raise RuntimeError("ZeroLion: call shard() after torch.distributed is initialised, before training")
        return sh

    def _qstate(self, w):
        st = self.state[w.anchor]
        if "m_codes" not in st:
            n, dev = self.shard_of(w).numel, w.codes.device
            st["m_codes"] = torch.zeros(n, dtype=torch.int8, device=dev)
            st["m_scales"] = torch.zeros(-(-n // self.block_size), dtype=torch.float32, device=dev)
        return st

    def _add_sq_shard(self, sq):
        self._sq_shard = sq if self._sq_shard is None else self._sq_shard + sq

    def _apply(self, w, grad, coef=None):
        """fused (coef None): `grad` is this rank's whole gradient. Its reduce-scatter starts now and the
        previous weight's, started one hook earlier and overlapped with the backward in between, is
        finished and applied (one in flight; _flush finishes the last). stack: already this rank's slice."""
        if coef is None:
            pending = (w, self.shard_of(w).reduce_scatter_async(grad))
            self._flush()
            self._pending = pending
            return
        self._update(w, grad, coef, None)

    def _flush(self) -> None:
        if self._pending is None:
            return
        w, result = self._pending
        self._pending = None
        grad, finite = result()
        # `finite` is the same on every rank (the flag was summed in the reduce-scatter): a weight with a
        # non-finite gradient anywhere is written by nobody, as on one device. The norm carries it.
        norm = self._note_norm(w, grad)
        norm = torch.where(finite, norm, torch.full_like(norm, math.nan))
        self._norms[-1] = (self._norms[-1][0], norm)
        if not self._measuring:
            self._update(w, grad, 1.0, norm, self._budget(w))

    def _tensor_norm(self, grad):
        """The whole weight's gradient norm from this rank's slice: the squares summed over ranks."""
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square().reshape(1)
        return comm.all_reduce_sum(sq).sqrt().reshape(())

    def _update(self, w, grad, coef, finite, budget=0.0):
        sh = self.shard_of(w)
        group = self._group_of[id(w)]
        st = self._qstate(w)
        if sh.numel:
            idx, val = sh.outliers()
            self.ops.lion_step(sh.codes(), sh.scales(), w.group, st["m_codes"], st["m_scales"], self.block_size,
                               grad, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                               weight_decay=group["weight_decay"], rounding=self.rounding, seed=self.seed,
                               step=self.step_count, offset=w.global_offset + sh.lo, outlier_idx=idx,
                               outlier_val=val, residual=w.residual, grad_scale=coef, finite=finite, clip=budget)
        if self.zero_stage < 3:
            sh.gather_update()

    def _reduce_stacked(self):
        """The stacked buffers become this rank's slices; their squared norm is summed over ranks in
        _norm_now, so nothing replicated is returned."""
        self.flow.scatter_buffers()
        sq = self.flow.stacked_sq_norm()
        if sq is not None:
            self._add_sq_shard(sq)
        return None

    def _norm_now(self):
        if self._sq_shard is not None:  # every rank reaches this with the same weights: same collectives
            self._add_sq(comm.all_reduce_sum(self._sq_shard.reshape(1).float()).reshape(()))
            self._sq_shard = None
        return super()._norm_now()

    def _skip(self, loss):
        self._flush()  # one device applied it inside backward already: so does every rank here
        self._sq_shard = None
        return super()._skip(loss)

    @torch.no_grad()
    def step(self, closure=None):
        before = self.step_count
        loss = super().step(closure)
        if self.step_count != before and self.outlier_refresh and self.step_count % self.outlier_refresh == 0:
            for w in self.weights:  # QFTLion re-selected them from the whole weight (gathered at stage 3)
                self.shard_of(w).reshard()
        return loss

    def state_nbytes(self) -> dict:
        out = super().state_nbytes()
        out.update(zero_stage=self.zero_stage, world_size=comm.world_size())
        return out
