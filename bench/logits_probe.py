"""Counts the logits-sized tensors (last dimension = the vocabulary) that torch creates and keeps alive.

A TorchDispatchMode sees every op's outputs, forward and backward (CPU autograd runs backward in the
calling thread). Each new storage whose tensor has `shape[-1] == vocab` is counted until its last tensor
dies (weakref finalizers: torch keeps a tensor's Python object alive while autograd still holds the
tensor, so a tensor saved for backward counts until backward frees it). Views of a counted storage are
not counted twice; views of an uncounted one (the head weight's transpose [hidden, vocab]) are not
logits and are skipped.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LogitsProbe(TorchDispatchMode):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.live = {}          # storage data_ptr -> [nbytes, tensors alive]
        self.live_bytes = 0
        self.peak_bytes = 0     # most bytes of logits-sized storages alive at once
        self.largest_fp32 = 0   # most elements of one fp32 [*, vocab] tensor
        self.largest_shape = None

    def _drop(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                    and t.is_floating_point() and t.numel()):
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self.live.get(ptr)
            if entry is None:
                if ptr in inputs:  # a view of an input that is not logits (e.g. the weight's transpose)
                    continue
                entry = self.live[ptr] = [t.untyped_storage().nbytes(), 0]
                self.live_bytes += entry[0]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            entry[1] += 1
            weakref.finalize(t, self._drop, ptr)
            if t.dtype == torch.float32 and t.numel() > self.largest_fp32:
                self.largest_fp32, self.largest_shape = t.numel(), tuple(t.shape)
        return out
