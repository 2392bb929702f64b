"""The stacked backward hook: where quantized weights' gradients go when they leave autograd.

Gradients arrive last layer first, one weight at a time, from QLinear/QEmbedding backward.

- `fused`: the optimizer update runs at once and the gradient is freed, so at most one layer's
  gradient is alive. A weight used by several modules (tied embedding and LM head) holds its first
  gradient until the last one arrives (head first, embedding last), then updates once.
- `stack`: each gradient is quantized to an int8 blockwise buffer and pushed on a LIFO stack (O(1));
  later micro-batches accumulate into the same buffer. At the accumulation boundary the optimizer pops
  them all and updates. This is the gradient-accumulation buffer: 1 byte/param instead of 4.

Non-finite gradients (stack): a NaN/inf would poison a whole int8 block's scale, so it is never
quantized; a device-side flag records it (no host sync per layer) and the optimizer skips the step.
"""
from __future__ import annotations

import torch

from qft_ds.quant.qtensor import QTensor


def deliver(weight, grad: torch.Tensor, uses: int = 1) -> None:
    """Called by the quantized modules' backward with a dense gradient of `weight` that covers `uses` of
    its `n_uses` readers (fused projections: the members that read one matmul's outputs)."""
    flow = getattr(weight, "_qft_flow", None)
    if flow is not None:
        flow.push(weight, grad, uses)
    elif weight.grad is None:  # no optimizer attached: keep it for inspection
        weight.grad = grad
    else:
        weight.grad += grad


class GradientFlow:
    def __init__(self, mode: str, apply_fn, block_size: int = 256, reduce_on_push=None):
        if mode not in ("fused", "stack"):
            raise ValueError(f"qft.flow must be 'fused' or 'stack', got {mode!r}")
        self.mode = mode
        self.apply_fn = apply_fn  # apply_fn(weight, grad_fp32): the optimizer's update
        self.block_size = block_size
        # stack: reduce_on_push(weight, grad) -> this rank's slice of the mean over ranks, kept instead of
        # the whole gradient (ZeRO 2/3); None keeps whole buffers, reduced at the boundary (map_buffers)
        self.reduce_on_push = reduce_on_push
        self._held = {}     # fused: weight -> [summed grad, uses seen]
        self._stack = []    # stack: weights in arrival order
        self._buffers = {}  # stack: weight -> int8 QTensor
        self._bad = None    # stack: device bool, True once a non-finite gradient arrived this step

    def attach(self, weights) -> None:
        for w in weights:
            w._qft_flow = self

    def push(self, weight, grad: torch.Tensor, uses: int = 1) -> None:
        if self.mode == "fused":
            if uses < weight.n_uses:
                held = self._held.get(weight)
                if held is None:  # summed in fp32: the uses' gradients may arrive in bf16
                    self._held[weight] = [grad.float(), uses]
                    return
                held[0] += grad
                held[1] += uses
                if held[1] < weight.n_uses:
                    return
                grad = self._held.pop(weight)[0]
            self.apply_fn(weight, grad)
            return
        bad = ~torch.isfinite(grad.sum())  # a sum is NaN/inf iff an element is (or it overflows: also bad)
        self._bad = bad if self._bad is None else self._bad | bad
        grad.nan_to_num_(0.0, 0.0, 0.0)  # in place: keeps the int8 buffer (and other ranks' slices) finite
        if self.reduce_on_push is not None:
            grad = self.reduce_on_push(weight, grad)
        buf = self._buffers.get(weight)
        if buf is None:
            self._buffers[weight] = QTensor.quantize(grad.reshape(-1), self.block_size, "rtn")
            self._stack.append(weight)
        else:  # accumulate: one dequantize-add-requantize, error bounded by half an int8 step
            acc = buf.dequantize().add_(grad.reshape(-1))
            q = QTensor.quantize(acc, self.block_size, "rtn")
            buf.codes, buf.scales = q.codes, q.scales

    def held(self):
        """Fused: gradients of weights whose other uses never arrived this step (e.g. unused head)."""
        out = [(w, held[0]) for w, held in self._held.items()]
        self._held.clear()
        return out

    def map_buffers(self, fn) -> None:
        """Stack: replace each int8 buffer by quantize(fn(weight, flat fp32 buffer)), one at a time. fn may
        return a slice (ZeRO): a slice starts on a block boundary, so its blocks are the buffer's blocks."""
        for w in self._stack:
            flat = self._buffers[w].dequantize().reshape(-1)
            self._buffers[w] = QTensor.quantize(fn(w, flat), self.block_size, "rtn")

    def stacked_sq_norm(self) -> torch.Tensor | None:
        sq = None
        for w in self._stack:
            s = self._buffers[w].dequantize().pow(2).sum()
            sq = s if sq is None else sq + s
        return sq

    def pop_all(self):
        """Stack: yield (weight, fp32 grad) last-in first-out and empty the stack."""
        self._bad = None
        while self._stack:
            w = self._stack.pop()
            yield w, self._buffers.pop(w).dequantize()

    def bad_flag(self):
        """Stack: a device bool, True if any gradient of this step held a NaN or inf (None if none came);
        the optimizer reads it in its one host sync per step."""
        return self._bad

    def discard(self) -> None:
        """Drop every held or stacked gradient of this step (a skipped step)."""
        self._held.clear()
        self._stack.clear()
        self._buffers.clear()
        self._bad = None

    def gradient_nbytes(self) -> int:
        return sum(b.nbytes() for b in self._buffers.values())
