"""The tensors autograd saves in forward, moved to host memory until backward needs them (DeepSpeed's
`"activation_checkpointing": {"cpu_checkpointing": true}`).

With checkpointed decoder layers, what autograd keeps from forward to backward is each layer's *input*
(the residual stream, fp32 [batch, tokens, hidden]) plus the few tensors saved outside the layers (the
final norm, the loss). Both torch checkpoint variants save a layer's inputs through `save_for_backward`
outside their own saved-tensor hooks (reentrant `CheckpointFunction.forward`; non-reentrant
`_CheckpointFrame.save_inputs`, before entering `_checkpoint_hook`), and the layer's own activations inside
them (or under no_grad), so an outer `torch.autograd.graph.saved_tensors_hooks` sees exactly those tensors.

`HostOffload` is that outer hook for one forward:
- pack copies a tensor to host memory and hands autograd the copy, so the device tensor is freed as soon as
  nothing else holds it. Model state (parameters, buffers: the int8 codes, scales and outliers) stays,
  matched by storage, since copying it would free nothing; so do tensors under `MIN_BYTES`;
- a tensor saved twice (one passed to every checkpointed layer) is copied once;
- unpack brings the copy back (a fresh device tensor each time: backward may unpack twice with
  retain_graph) and starts bringing back the tensor packed just before it, which backward (LIFO) will
  want next, so one layer's input crosses while the layer before it computes.
On CUDA the copies run on a side stream into pinned memory (torch's caching host allocator); events order
them against the compute stream, and `record_stream` keeps the allocator from reusing a device block
before its copy has read it. On the CPU the same path runs with plain copies, which the tests exercise.
"""
from __future__ import annotations

import functools
import itertools
import weakref

import torch
from torch import nn

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: their copies would cost more than they free

_dead = lambda: None  # noqa: E731  a weakref that never resolves
_SIDE_STREAMS: dict = {}  # device -> the copy stream, one per device for the process


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _HostCopy:
    """A saved tensor's host copy, and its way back to the device."""

    __slots__ = ("host", "device", "copied", "source", "prev", "ready", "ready_event", "__weakref__")

    def __init__(self, t: torch.Tensor, prev):
        self.device = t.device
        self.source = weakref.ref(t)  # dead once the offload freed the device tensor (tests check it)
        self.prev = prev  # weakref to the copy packed just before: backward's next unpack
        self.ready = self.ready_event = None  # a prefetched device tensor
        self.host = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
        if t.is_cuda:
            stream = _side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the compute stream
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(stream)
            t.record_stream(stream)  # the allocator must not reuse t's block before the copy read it
        else:
            self.host.copy_(t)
            self.copied = None

    def prefetch(self) -> None:
        """Start the copy back on the side stream (on the CPU: make it now)."""
        if self.ready is not None:
            return
        if self.device.type == "cuda":
            stream = _side_stream(self.device)  # after this copy's own device-to-host copy: same stream
            with torch.cuda.stream(stream):
                self.ready = self.host.to(self.device, non_blocking=True)
                self.ready_event = torch.cuda.Event()
                self.ready_event.record(stream)
        else:
            self.ready = self.host.to(self.device, copy=True)

    def take(self) -> torch.Tensor:
        """The tensor on its device, for the compute stream."""
        self.prefetch()
        t, event = self.ready, self.ready_event
        self.ready = self.ready_event = None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            t.record_stream(torch.cuda.current_stream(self.device))  # allocated on the side stream
        return t


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks for one forward: large saved tensors other than `model`'s state go to host
    memory (module docstring). It keeps only weak references to its copies (autograd owns them), and
    counts what it did."""

    def __init__(self, model: nn.Module, min_bytes: int | None = None):
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.state = {t.untyped_storage().data_ptr()
                      for t in itertools.chain(model.parameters(), model.buffers()) if t is not None}
        self.copies: list = []  # weakrefs to this forward's _HostCopy objects, in pack order
        self._by_id: dict = {}  # id(saved tensor) -> weakref to its copy, for a tensor saved twice
        self.kept_state = self.kept_small = 0  # saves left on the device, by reason
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self.state:
            self.kept_state += 1
            return t
        if t.numel() * t.element_size() < self.min_bytes or t.layout != torch.strided:
            self.kept_small += 1
            return t
        twin = self._by_id.get(id(t), _dead)()
        if twin is not None and twin.source() is t:
            return twin
        copy = _HostCopy(t, self.copies[-1] if self.copies else None)  # the previous one, weakly
        self.copies.append(weakref.ref(copy))
        self._by_id[id(t)] = self.copies[-1]
        self.offloaded_bytes += t.numel() * t.element_size()
        return copy

    def __enter__(self):
        super().__enter__()
        return self

    def __exit__(self, *exc):
        self._by_id.clear()  # a later tensor may reuse an id
        return super().__exit__(*exc)

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _HostCopy):
            return packed
        t = packed.take()
        prev = packed.prev() if packed.prev is not None else None
        if prev is not None:
            prev.prefetch()
        return t


def offload_saved_tensors(model: nn.Module, min_bytes: int | None = None) -> nn.Module:
    """Wrap `model.forward` (once) so every call with grad enabled runs under a fresh HostOffload; the last
    one is `model.qft_host_offload` (its counters, for tests and benchmarks)."""
    if getattr(model.forward, "_qft_host_offload", False):
        return model
    forward = model.forward

    @functools.wraps(forward)
    def offload_forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing is saved
            return forward(*args, **kwargs)
        offload = model.qft_host_offload = HostOffload(model, min_bytes)
        with offload:
            return forward(*args, **kwargs)

    offload_forward._qft_host_offload = True
    model.forward, model.qft_host_offload = offload_forward, None
    return model
