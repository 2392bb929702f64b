"""QLinear and QEmbedding: modules over a HybridWeight whose gradients leave autograd in backward.

Forward dequantizes the weight to the compute dtype (bf16 or fp32) for one matmul and frees it.
Backward computes grad_input, then grad_weight, and hands grad_weight to the flow
(qft_ds.flow.deliver); autograd never accumulates it, so no model-sized gradient ever exists.

Two ways to the same numbers (tests compare them):
- inside a checkpointed layer, or without grad, the matmul is torch's own `F.linear` on the dequantized
  weight, which passes through `_DeliverGrad` (an identity whose backward delivers the weight's gradient):
  torch's C++ backward does both matmuls, one small Python node is left per weight. The training step
  is host-bound (bench/NOTES.md), and a Python autograd Function with the matmuls in it cost ~2x
  nn.Linear's host time. The saved dequantized weight is the recompute's and lives until the layer's
  backward, as a checkpointed layer's activations do;
- elsewhere `_QLinearFn` saves only the input and dequantizes again in backward: holding every layer's
  dequantized weight from forward to backward would be a bf16 copy of the model.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.flow import deliver
from qft_ds.nn.precision import linear_in
from qft_ds.quant.hybrid import HybridWeight

logger = logging.getLogger("qft_ds")


def _uses(readers) -> int:
    """How many of the weight's uses one matmul's gradient covers: the fused projections that read its
    outputs (`readers`, filled in as they read them), else 1."""
    return len(readers) if readers is not None else 1


class _QLinearFn(torch.autograd.Function):
    """The matmul with its backward in Python, for layers that are not checkpointed: only the input is
    saved, and backward dequantizes the weight again."""

    @staticmethod
    def forward(ctx, x, anchor, weight: HybridWeight, cdt, readers=None):
        xc, y = linear_in(x, weight, cdt)
        ctx.save_for_backward(xc)
        # readers: the fused projections whose outputs this call produced (filled in as they read them);
        # the gradient counts as that many of the weight's uses
        ctx.weight, ctx.x_dtype, ctx.readers = weight, x.dtype, readers
        return y

    @staticmethod
    def backward(ctx, gy):
        (xc,) = ctx.saved_tensors
        weight = ctx.weight
        gy = gy.to(xc.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight.dequantize(xc.dtype)).to(ctx.x_dtype)
        gw = gy.reshape(-1, gy.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])
        # in the compute dtype: the Lion kernel upcasts in registers (6 B/param, not 8)
        deliver(weight, gw, _uses(ctx.readers))
        return gx, None, None, None, None


class _DeliverGrad(torch.autograd.Function):
    """Identity on a dequantized weight; its backward hands the weight's gradient to the flow. It holds
    no tensor, so checkpointing's first forward keeps nothing alive."""

    @staticmethod
    def forward(ctx, w, anchor, weight: HybridWeight, readers=None):
        ctx.weight, ctx.readers = weight, readers
        return w

    @staticmethod
    def backward(ctx, gw):
        deliver(ctx.weight, gw, _uses(ctx.readers))
        return None, None, None, None


def _weight_view(w: torch.Tensor, weight: HybridWeight) -> torch.Tensor:
    """`.weight` for code outside the module: with grad enabled, its gradient is delivered to the flow like
    the module's own, so a library that projects with `module.weight` trains the int8 weight rather than
    a copy nobody reads. Without grad (generation, saving) the plain copy."""
    return _DeliverGrad.apply(w, weight.anchor, weight) if torch.is_grad_enabled() else w


NO_KEEP, KEEP, RECOMPUTE = 0, 1, 2


def qlinear(x, weight: HybridWeight, cdt, keep_weight: int, readers=None):
    """x @ W^T over a HybridWeight in compute dtype `cdt` (see the module docstring for the two paths);
    out in the compute dtype under autocast, else in x's dtype, like torch.nn.Linear. `keep_weight`: see
    QLinear.keeps_weight."""
    if x.numel() == 0:  # nothing to project (the chunked loss's head call keeps no position): no dequantize
        return x.new_empty((*x.shape[:-1], weight.shape[0]),
                           dtype=cdt if torch.is_autocast_enabled(x.device.type) else x.dtype)
    grad = torch.is_grad_enabled()
    if grad and not keep_weight:
        return _QLinearFn.apply(x, weight.anchor, weight, cdt, readers)
    w = weight.dequantize(cdt)
    if grad:
        if keep_weight == RECOMPUTE:  # saves what the first forward saved (checkpoint checks), delivers nothing
            w.requires_grad_()
        else:
            w = _DeliverGrad.apply(w, weight.anchor, weight, readers)
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, w)  # autocast casts x (to bf16: w is already)
    return F.linear(x.to(cdt), w).to(x.dtype)


_NORM_ONLY = [False]  # inside norm_only_gradients(): a plain global, as CUDA runs backward in its own thread


@contextlib.contextmanager
def norm_only_gradients(enabled: bool = True):
    """Inside (`enabled`), the delivered gradients are only measured, by their norm, never applied, and not
    reduced over ranks (the caller's promise: clipping's norm pass on one device). An embedding read once
    (not tied) then delivers only the rows its tokens touched, [unique ids, hidden], whose norm is the dense
    gradient's: the same rows, whose norm is summed in another order (fp32 ulps). The dense fp32 [vocab,
    hidden] was 1.96 GiB at Llama-3-8B, made while the pass's retained graph was alive (bench/NOTES.md)."""
    before, _NORM_ONLY[0] = _NORM_ONLY[0], enabled
    try:
        yield
    finally:
        _NORM_ONLY[0] = before


class _QEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, anchor, weight: HybridWeight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return weight.dequantize_rows(ids)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        weight, pad = ctx.weight, ctx.padding_idx
        ids, gy = ids.reshape(-1), gy.reshape(-1, gy.shape[-1]).float()
        if _NORM_ONLY[0] and weight.n_uses == 1:  # a tied head's dense gradient would be summed with it
            ids, rows = torch.unique(ids, return_inverse=True)
            gw = torch.zeros((ids.numel(), weight.shape[1]), dtype=torch.float32, device=gy.device)
            gw.index_add_(0, rows, gy)
            if pad is not None:
                gw[ids == pad] = 0.0
        else:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=gy.device)
            gw.index_add_(0, ids, gy)
            if pad is not None:
                gw[pad] = 0.0
        deliver(weight, gw)
        return None, None, None, None


class QLinear(nn.Module):
    """y = x W^T (+ b) over a HybridWeight. With `fused` (a FusedProjections shared by siblings such as
    q/k/v_proj, whose rows are stacked in one HybridWeight) this module's W is `rows` of that weight."""

    def __init__(self, qweight: HybridWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32, fused: "FusedProjections | None" = None,
                 member: int = 0):
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.shape[1]
        self.rows = fused.rows[member] if fused is not None else (0, qweight.shape[0])
        self.out_features = self.rows[1] - self.rows[0]
        self.bias = nn.Parameter(bias.detach().float()) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.fused, self.member = fused, member
        qweight.n_uses += 1

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy, for code that reads `.weight` instead of calling the module (TRL's fused
        LM head does); writing to it changes nothing. With grad enabled, its gradient reaches the int8
        update like the module's own (a fused projection's rows: not delivered, see _weight_view)."""
        w = self.qweight.dequantize(torch.float32)
        if self.fused is not None:
            return w[self.rows[0]:self.rows[1]]
        return _weight_view(w, self.qweight)

    def keeps_weight(self) -> int:
        """NO_KEEP, or (a checkpointed layer in training) KEEP, or RECOMPUTE: KEEP inside the recompute of
        a non-reentrant checkpoint, which runs during backward and whose graph is never backpropagated
        (only the tensors it saves are used): the weight then needs no delivery node."""
        ref = _CHECKPOINTED_LAYER.get(self)
        layer = ref() if ref is not None else None
        # read each call: gradient_checkpointing_disable() must stop the reuse, or every weight is kept
        if not (layer is not None and getattr(layer, "gradient_checkpointing", False) and layer.training
                and torch.is_grad_enabled()):
            return NO_KEEP
        fn = getattr(layer, "_gradient_checkpointing_func", None)  # HF: partial(checkpoint, use_reentrant=..)
        non_reentrant = isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant") is False
        return RECOMPUTE if non_reentrant and torch._C._current_graph_task_id() != -1 else KEEP

    def forward(self, x):
        if self.fused is not None:
            y = self.fused.output(self, x)
        else:
            y = qlinear(x, self.qweight, self.compute_dtype, self.keeps_weight())
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        rows = f", rows={self.rows[0]}:{self.rows[1]} of a fused weight" if self.fused is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}{rows}")


class FusedProjections:
    """Sibling projections that read the same input (q/k/v_proj, gate/up_proj) over one HybridWeight
    with their rows stacked: the first member called computes every member's output in one matmul and the
    others take their slice, so the host work per layer (dequantize, matmul, autograd node, Lion update;
    the step is host-bound, bench/NOTES.md) is paid once instead of per projection.

    A member called with another input, grad mode or autocast state than the pending outputs were made
    with computes afresh, so the result is always right. The gradient of each matmul then counts as the
    number of members that read its outputs (the others' rows are zero), and the fused flow updates the
    weight once, when all members' gradients are in.
    """

    def __init__(self, sizes: list[int]):
        self.sizes = list(sizes)
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.rows = [(a, a + n) for a, n in zip(starts, self.sizes)]
        self._pending: _Pending | None = None

    def output(self, member: QLinear, x: torch.Tensor) -> torch.Tensor:
        key = (x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        p, i = self._pending, member.member
        if p is not None and p.input() is x and p.key == key and i in p.left:
            p.left.discard(i)
            p.readers.append(i)
            if not p.left:
                self._pending = None  # every member has its output: hold nothing
            return p.outputs[i]
        readers = [i]
        y = qlinear(x, member.qweight, member.compute_dtype, member.keeps_weight(), readers)
        outputs = y.split(self.sizes, dim=-1)
        left = set(range(len(self.sizes))) - {i}
        self._pending = _Pending(weakref.ref(x), key, outputs, readers, left) if left else None
        return outputs[i]


@dataclass
class _Pending:
    """Outputs of one fused matmul not yet taken by their members."""
    input: weakref.ref      # the input they were computed from
    key: tuple              # its version, grad mode and autocast state then
    outputs: tuple          # one per member
    readers: list           # members that took theirs (the _QLinearFn ctx holds this list)
    left: set               # members still to take theirs


class QEmbedding(nn.Module):
    def __init__(self, qweight: HybridWeight, padding_idx: int | None = None):
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        qweight.n_uses += 1

    @property
    def weight(self) -> torch.Tensor:
        """As QLinear.weight: a dequantized fp32 copy whose gradient, with grad enabled, reaches the int8
        update (a tied LM head computed from `embed_tokens.weight`)."""
        return _weight_view(self.qweight.dequantize(torch.float32), self.qweight)

    def forward(self, ids):
        # fp32 out: the residual stream stays fp32, matmuls run in the compute dtype.
        return _QEmbeddingFn.apply(ids, self.qweight.anchor, self.qweight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


# QLinear -> weakref to its enclosing checkpointed layer. Kept outside the modules so that they still
# pickle, and a deepcopy (new modules, not in here) never reads another model's layer.
_CHECKPOINTED_LAYER: "weakref.WeakKeyDictionary[QLinear, weakref.ref]" = weakref.WeakKeyDictionary()


def enable_checkpointing(model: nn.Module, reentrant: bool) -> None:
    """HF gradient checkpointing of the decoder layers, with torch's reentrant or non-reentrant checkpoint.
    transformers >= 5.23 calls it `activation_checkpointing_enable` (the old name warns); older ones
    `gradient_checkpointing_enable`. Reentrant needs an input that requires grad: the embedding's output
    is made to."""
    _warn_if_replacing(model, reentrant)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        raise ValueError("qft.gradient_checkpointing needs a transformers model")
    if reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _warn_if_replacing(model: nn.Module, reentrant: bool) -> None:
    """Say so when `qft.gradient_checkpointing` replaces a different set-up the caller made (HF Trainer's
    every_n_layers, transformers' offload, another use_reentrant): every layer is checkpointed again with
    qft_ds's choice, and the caller's settings no longer apply."""
    def ckpt(m):
        return hasattr(m, "_gradient_checkpointing_func")
    # the checkpointed layers: modules with the attribute and none below them (the model has it too)
    layers = [m for m in model.modules() if ckpt(m) and not any(ckpt(c) for c in m.modules() if c is not m)]
    on = [m for m in layers if getattr(m, "gradient_checkpointing", False)]
    if not on:
        return
    mine = {"use_reentrant": reentrant}
    theirs = {str(getattr(getattr(m, "_gradient_checkpointing_func"), "keywords", None)) for m in on}
    differs = len(on) < len(layers) or theirs != {str(mine)}
    if differs:
        logger.warning(
            f"qft_ds: qft.gradient_checkpointing replaces the model's own checkpointing ({len(on)} of "
            f"{len(layers)} layers, {' / '.join(sorted(theirs))}): every layer is now checkpointed with "
            f"use_reentrant={reentrant} (qft.checkpoint_reentrant). Leave qft.gradient_checkpointing out to "
            f"keep the model's set-up.")


def mark_checkpointed(model: nn.Module) -> int:
    """Flag the QLinears inside transformers layers that run under gradient checkpointing, so their
    backward reuses the recompute's dequantized weight (one dequantize fewer per weight and step). Call
    after gradient_checkpointing_enable(); returns how many were flagged. A layer checkpointed some other
    way is simply not flagged: it dequantizes once more in backward, as before."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no per-layer flag to read
        return 0
    flagged = 0
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and getattr(layer, "gradient_checkpointing", False):
            for m in layer.modules():
                if isinstance(m, QLinear):
                    _CHECKPOINTED_LAYER[m] = weakref.ref(layer)
                    flagged += 1
    return flagged
