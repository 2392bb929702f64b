"""How QFTLion's int8 state is placed over data-parallel ranks: a strategy the optimizer core is given.

The core (lion.py) holds the Lion update, the norms and clipping, the non-finite checks and the step
bookkeeping, written once. A strategy answers where the tensors it updates live and owns every
collective, so sharding never reaches the maths (as torchao's optimizers run unchanged on FSDP2
shards):
- `owned(w)`: the part of a quantized weight this rank updates (codes, scales, outliers, residual and
  the global element offset of its first element: the stochastic-rounding key);
- `owned_range(w)`: that slice's element range [lo, hi) (its momentum's size; checkpoints read it);
- `reduce(w, grad)`: a fused gradient's reduction over ranks, started now; calling the result gives
  (the owned slice of the mean gradient, a device flag "finite on every rank" or None);
- `overlap_depth`: how many weights' reductions the core keeps in flight before it applies the oldest
  (0: each applied at once), so that a reduction runs while the next weights' backward does;
- `grad_norm(grad, finite)`: the whole weight's gradient norm from the owned slice (NaN if not finite);
- `after_update(w)`: the gather that follows an owner's update; `reshard(w)` after outliers change;
- `end_step()`: after every optimizer step (ZeRO-3's gather prefetch follows a trace of one step);
- `reduce_on_push` / `reduce_stacked(flow)`: the stack flow's buffers, per micro-batch or at the
  boundary; the latter returns their squared norm over the whole model;
- `shard(weights, block)`, `stage`, `describe()`: setup, the ZeRO stage (0 here), state_nbytes extras.

`NoSharding` is one device or plain data parallel: each gradient is all-reduced (mean) and every rank
applies the same update; under data parallel the fused flow's all-reduce runs during the next layer's
backward (one more gradient alive), as ZeRO's reduce-scatter does. It must cost the one-device path
nothing: no launch, no host sync, no deferred update.
ZeRO stages 1-3 are `qft_ds.zero.ZeroSharding`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qft_ds import comm


class Owned(NamedTuple):
    """The slice [lo, hi) of a quantized weight that this rank updates (the whole weight unsharded)."""
    codes: torch.Tensor
    scales: torch.Tensor
    outlier_idx: torch.Tensor  # indices local to the slice
    outlier_val: torch.Tensor  # a view into the weight's: the update writes it
    residual: torch.Tensor | None
    offset: int                # global element offset of `lo`
    lo: int
    hi: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """Data parallel: every rank applies the mean gradient, so int8 states stay identical (the
    stochastic-rounding draws are keyed by global offset and match on every rank)."""
    if comm.is_distributed():
        grad = comm.all_reduce_mean_(grad.float())  # summed in fp32 whatever the compute dtype
    return grad


class NoSharding:
    """Every rank holds and updates whole weights (one device, or plain data parallel).

    `reduce_dtype`: the fused flow's all-reduce. fp32 (default) sums the ranks' gradients exactly, so the
    mean has the bits of one device's; bf16 halves the bytes and rounds the sum of bf16 gradients to bf16
    once (DeepSpeed's "communication_data_type": "bf16"). The stack flow's int8 buffers reduce in fp32."""
    stage = 0
    reduce_on_push = None  # the stack keeps whole buffers, reduced at the boundary

    def __init__(self, reduce_dtype: torch.dtype = torch.float32, overlap: int = 1):
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"NoSharding reduces gradients in fp32 or bf16, got {reduce_dtype}")
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0 weights, got {overlap}")
        self.reduce_dtype = reduce_dtype
        self.overlap = overlap  # data parallel: each in flight holds one more reduced gradient

    @property
    def overlap_depth(self) -> int:
        return self.overlap if comm.is_distributed() else 0

    def shard(self, weights, block_size: int) -> None:
        pass

    def owned(self, w) -> Owned:
        return Owned(w.codes, w.scales, w.outlier_idx, w.outlier_val, w.residual, w.global_offset, 0, w.numel)

    def owned_range(self, w) -> tuple[int, int]:
        return 0, w.numel

    def reduce(self, w, grad: torch.Tensor):
        if not comm.is_distributed():
            return lambda: (grad, None)
        # NaN on any rank is NaN on all: every rank skips alike
        pending = comm.all_reduce_mean_async(grad, reduce_dtype=self.reduce_dtype)
        return lambda: (pending.wait(), None)

    def grad_norm(self, grad: torch.Tensor, finite) -> torch.Tensor:
        """The gradient's fp32 norm (one launch). It is also the finite flag the kernel reads (a gradient
        is finite iff its fp32 norm is) and what its clipping budget is applied to."""
        return torch.linalg.vector_norm(grad, dtype=torch.float32)

    def after_update(self, w) -> None:
        pass

    def reshard(self, w) -> None:
        pass

    def end_step(self) -> None:
        pass

    def reduce_stacked(self, flow):
        """At the boundary: average the int8 buffers over ranks; their squared norm (None if empty)."""
        flow.map_buffers(lambda w, g: mean_over_ranks(g))
        return flow.stacked_sq_norm()

    def describe(self) -> dict:
        return {} if self.reduce_dtype == torch.float32 else {"reduce_dtype": "bf16"}
