"""Layers that are not exactly nn.Linear or nn.Embedding, and how conversion treats them.

- A subclass of nn.Linear or nn.Embedding that does not override `forward`, or whose `forward` (called with
  one input) gives the parent's output (Falcon's FalconLinear), converts like its parent.
- A subclass of nn.Embedding whose `forward` gives the parent's output times a constant (Gemma's scaled
  word embedding: `super().forward(ids) * embed_scale`) becomes a ScaledQEmbedding with that constant.
- transformers' Conv1D (GPT-2: a Linear with the weight stored transposed, [in, out]) becomes a QConv1D
  over a HybridWeight in the same [in, out] layout, so exports write the weight as GPT-2 reads it.
- transformers' MoE experts (3-D Parameters, one slice per expert) become a QExperts over one HybridWeight
  per slice (qft_ds.nn.experts), if its maths reproduces the module's forward on a probe.
- Anything else (a forward with other inputs, such as OPT's learned positions, or other maths, or its
  own trainable parameters) stays fp32, with the reason: `classify` says why, and conversion lists it.

`classify` decides from the module alone (its type, its forward's signature, and a probe on random
input with its own weights); it never changes the module.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.flow import deliver
from qft_ds.nn import experts
from qft_ds.nn.qmodules import KEEP, NO_KEEP, RECOMPUTE, QEmbedding, QLinear, _DeliverGrad
from qft_ds.quant.hybrid import HybridWeight

LINEAR, EMBEDDING, CONV1D, KEPT = "linear", "embedding", "conv1d", "kept"
EXPERTS = experts.EXPERTS


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def takes_one_input(forward) -> bool:
    """True if `forward` (bound) can be called with one positional argument and nothing else."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(required) <= 1 and bool(positional) and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in required)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    if got.shape != want.shape or not torch.isfinite(want).all():
        return False
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    err = (got.double() - want.double()).norm()
    return bool(err <= tol * want.double().norm() + 1e-12)


def _own_parameters(module: nn.Module, allowed: tuple) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False) if n not in allowed]


@torch.no_grad()
def classify(module: nn.Module):
    """(kind, detail) for a module conversion would quantize, else None (not a weight layer):
    kind LINEAR / EMBEDDING (detail: the embedding's output scale, or None) / CONV1D / EXPERTS, or KEPT with
    the reason (a sentence) as detail."""
    verdict = experts.classify(module)
    if verdict is not None:
        return verdict
    conv1d = _conv1d_type()
    if conv1d is not None and type(module) is conv1d:
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and tuple(w.shape) == (module.nx, module.nf):
            return CONV1D, None
        return KEPT, "a Conv1D whose weight is not [nx, nf]"
    if isinstance(module, nn.Linear):
        return _classify_linear(module)
    if isinstance(module, nn.Embedding):
        return _classify_embedding(module)
    return None


def _subclass_note(module, base) -> str:
    return f"{type(module).__name__} (a subclass of nn.{base.__name__})"


def _classify_linear(module: nn.Linear):
    w = module.weight
    if not isinstance(w, nn.Parameter) or w.dim() != 2 or not w.is_floating_point():
        return KEPT, "its weight is not a 2-D float Parameter"
    if type(module) is nn.Linear or type(module).forward is nn.Linear.forward:
        return LINEAR, None
    what = _subclass_note(module, nn.Linear)
    extra = _own_parameters(module, ("weight", "bias"))
    if extra:
        return KEPT, f"{what} has its own parameters ({', '.join(extra)}) that its forward uses"
    if not takes_one_input(module.forward):
        return KEPT, f"{what} overrides forward with other inputs; int8 cannot reproduce it"
    gen = torch.Generator().manual_seed(0)
    try:
        for shape in ((2, 3, w.shape[1]), (5, w.shape[1])):
            x = torch.randn(*shape, generator=gen).to(w.device, w.dtype)
            if not _close(module(x), F.linear(x, w, module.bias), w.dtype):
                return KEPT, f"{what} overrides forward with other maths than x @ W^T + b; int8 cannot reproduce it"
    except Exception as e:  # a forward that wants more than a tensor
        return KEPT, (f"{what} overrides forward, which fails on one input alone ({type(e).__name__}): "
                      "int8 cannot reproduce it")
    return LINEAR, None


def _classify_embedding(module: nn.Embedding):
    w = module.weight
    if not isinstance(w, nn.Parameter) or w.dim() != 2 or not w.is_floating_point():
        return KEPT, "its weight is not a 2-D float Parameter"
    if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
        return KEPT, "an embedding with max_norm, sparse or scale_grad_by_freq; QEmbedding has none of them"
    if type(module) is nn.Embedding or type(module).forward is nn.Embedding.forward:
        return EMBEDDING, None
    what = _subclass_note(module, nn.Embedding)
    extra = _own_parameters(module, ("weight",))
    if extra:
        return KEPT, f"{what} has its own parameters ({', '.join(extra)}) that its forward uses"
    if not takes_one_input(module.forward):
        return KEPT, f"{what} overrides forward with other inputs; int8 cannot reproduce it"
    gen = torch.Generator().manual_seed(0)
    scale = None
    try:
        for shape in ((2, 5), (7,)):
            ids = torch.randint(0, w.shape[0], shape, generator=gen, device=w.device)
            want, base = module(ids), F.embedding(ids, w, module.padding_idx)
            if scale is None:
                scale = _scale_of(module, want, base)
            if scale is None or not _close((base.double() * scale).to(want.dtype), want, w.dtype):
                return KEPT, (f"{what} overrides forward with other maths than a lookup times a constant; "
                              "int8 cannot reproduce it")
    except Exception as e:  # OPT's positions: forward takes an attention mask, not token ids
        return KEPT, (f"{what} overrides forward, which does not take token ids alone ({type(e).__name__} on a "
                      "probe): int8 cannot reproduce it")
    return EMBEDDING, (None if scale == 1.0 else scale)


def _scale_of(module: nn.Module, want: torch.Tensor, base: torch.Tensor):
    """The constant c with want = c * base: the module's `embed_scale` as its forward casts it (Gemma casts it
    to the weight's dtype), else the least-squares fit."""
    if want.shape != base.shape:
        return None
    declared = getattr(module, "embed_scale", None)
    if isinstance(declared, (int, float)) or (torch.is_tensor(declared) and declared.numel() == 1):
        c = float(torch.as_tensor(declared).to(module.weight.dtype))
        if _close((base.double() * c).to(want.dtype), want, module.weight.dtype):
            return c
    b, y = base.double().reshape(-1), want.double().reshape(-1)
    denom = float(b @ b)
    return float(b @ y) / denom if denom > 0 else None


class ScaledQEmbedding(QEmbedding):
    """QEmbedding whose output is multiplied by a constant (Gemma: sqrt(hidden_size)); the stored weight is
    the unscaled table, as in the original module, so exports and tied heads read the same weight."""

    def __init__(self, qweight: HybridWeight, padding_idx: int | None = None, scale: float = 1.0):
        super().__init__(qweight, padding_idx)
        self.scale = float(scale)

    def forward(self, ids):
        return super().forward(ids) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class _QConv1DFn(torch.autograd.Function):
    """x @ W (+ nothing: the bias is added outside) for W stored [in, out]; saves only the input and
    dequantizes again in backward, like qmodules._QLinearFn."""

    @staticmethod
    def forward(ctx, x, anchor, weight: HybridWeight, cdt):
        xc = x.to(cdt)
        y = torch.matmul(xc, weight.dequantize(cdt))
        ctx.save_for_backward(xc)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        (xc,) = ctx.saved_tensors
        weight = ctx.weight
        gy = gy.to(xc.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight.dequantize(xc.dtype).t()).to(ctx.x_dtype)
        gw = xc.reshape(-1, xc.shape[-1]).t() @ gy.reshape(-1, gy.shape[-1])  # [in, out], as stored
        deliver(weight, gw)
        return gx, None, None, None


class QConv1D(QLinear):
    """transformers' Conv1D (y = x W + b, W stored [in, out]) over a HybridWeight in that layout."""

    def __init__(self, qweight: HybridWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(qweight, bias, compute_dtype)
        self.in_features, self.out_features = qweight.shape
        self.nx, self.nf = qweight.shape
        self.rows = (0, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy in Conv1D's [in, out] layout; writing to it changes nothing."""
        return self.qweight.dequantize(torch.float32)

    def forward(self, x):
        keep = self.keeps_weight()
        if torch.is_grad_enabled() and keep == NO_KEEP:
            y = _QConv1DFn.apply(x, self.qweight.anchor, self.qweight, self.compute_dtype)
        else:
            w = self.qweight.dequantize(self.compute_dtype)
            if torch.is_grad_enabled():
                if keep == RECOMPUTE:
                    w.requires_grad_()
                elif keep == KEEP:
                    w = _DeliverGrad.apply(w, self.qweight.anchor, self.qweight)
            if torch.is_autocast_enabled(x.device.type):
                y = torch.matmul(x.to(w.dtype), w)
            else:
                y = torch.matmul(x.to(self.compute_dtype), w).to(x.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"nx={self.nx}, nf={self.nf}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype} (transformers Conv1D layout)")
