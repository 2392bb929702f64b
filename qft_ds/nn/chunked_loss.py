"""The causal-LM loss with the LM head's logits made a chunk of tokens at a time (`"qft": {"chunked_loss": N}`).

At a 128k vocabulary the fp32 logits [tokens, vocab] and their gradient outweigh every other activation
(2048 tokens: 1.05 GB each, more with the loss's temporaries). Here they exist N tokens at a time, in
forward only: the loss is a scalar, so forward computes their gradient too, chunk by chunk, and no logits
are recomputed in backward.

How it hooks in (install_chunked_loss): the model's forward, called with labels, runs with labels=None and
`logits_to_keep` an empty index (its head projects no position), a forward hook on the decoder catches the
last hidden state (what the head would read), and the loss is computed here. The output carries the loss
and no logits. Calls without labels are untouched.

The loss is HF's ForCausalLMLoss: labels shifted by one, -100 ignored, mean over the other tokens (or sum /
`num_items_in_batch` when the trainer passes it). Ignored tokens are dropped before the head: they add
nothing to the loss or to any gradient.

The head's weight gradient: QLinear delivers one gradient per matmul to the flow, and the fused flow
updates a weight when all its uses have delivered. Per chunk deliveries would update after the first
chunk, so `_ChunkedHeadLoss` does the head's matmuls itself and delivers in backward, once, like one
QLinear call. For few tokens (2048 at hidden 4096 in bf16) it keeps the logits' gradient, dequantizes the
int8 weight a slice of rows at a time (never whole) and makes the weight's gradient in backward with
QLinear's own matmul; for many it dequantizes the weight once (not per chunk) and sums the chunks' weight gradients in fp32 and rounds once (both: _ChunkedHeadLoss). Against the
unchunked loss: each token's logits, loss, logits' gradient and input gradient come from the same ops; the
loss (and the weight gradient when summed) in another order, so they agree to fp32 rounding
(tests/nn/test_chunked_loss.py).
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.flow import deliver

IGNORE_INDEX = -100  # HF's ForCausalLMLoss default
# config attributes of models that transform the logits after the head (the chunked loss would skip it)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over tokens of cross_entropy(x @ W^T, target) / denom, with x [n, hidden] and W the head's
    HybridWeight, for n tokens that all have a target.

    The loss is a scalar, so its gradients are those of a unit upstream gradient times the one that comes:
    forward computes the logits' gradient chunk by chunk (no logits recomputed in backward, as a fused
    linear cross-entropy does) and x's gradient [n, hidden]; backward scales them and delivers W's. W's
    gradient is made one of two ways, whichever holds fewer bytes (keeps_logits_grad):
    - `keep`: the logits' gradient of every token is kept in the compute dtype, [n, vocab], and backward
      makes W's gradient from it in one matmul, the unchunked QLinear's own (fp32 accumulation inside,
      rounded once). W is dequantized a slice of rows at a time (_keep_way): nothing [vocab, hidden] is
      alive in forward, and in backward only W's gradient (2048 tokens of a 128k vocabulary in bf16: the
      kept buffer is half a bf16 W);
    - `sum`: W's gradient is summed over chunks in fp32 from fp32 products and rounded once to the compute
      dtype (a bf16 sum would round per chunk): an fp32 [vocab, hidden] beside the dequantized W in forward,
      then W's gradient [vocab, hidden] in the compute dtype held to backward. For many tokens.
    Without grad (evaluation) it computes the loss only."""

    @staticmethod
    def forward(ctx, x, anchor, weight, cdt, targets, denom, chunk: int, want_grad: bool, keep: bool):
        scale = 1.0 / denom  # each token's loss gets the upstream gradient / count from the mean's backward
        if want_grad and keep:
            total, gx, gy_all = _keep_way(x, weight, cdt, targets, scale, chunk)
            ctx.save_for_backward(x, gx, gy_all)
            ctx.weight, ctx.cdt, ctx.keep = weight, cdt, keep
            return total / denom
        w = weight.dequantize(cdt)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x) if want_grad else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if want_grad else None
        for i in range(0, x.shape[0], chunk):
            xc = x[i:i + chunk].to(cdt)
            loss, g = _chunk_loss(F.linear(xc, w), targets[i:i + chunk], scale, want_grad)
            total += loss
            if not want_grad:
                continue
            gy = g.to(cdt)  # QLinear's backward takes the logits' gradient in the compute dtype too
            del g
            gx[i:i + chunk] = (gy @ w).to(x.dtype)
            add_mm_fp32(gw, gy.t(), xc)
        del w  # before W's gradient is rounded: one [vocab, hidden] in the compute dtype at a time
        if want_grad:
            ctx.save_for_backward(x, gx, gw.to(cdt))
        ctx.weight, ctx.cdt, ctx.keep = weight, cdt, keep
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss):
        x, gx, saved = ctx.saved_tensors
        # fresh tensors: the flow may sum into or sanitise what it gets, and a retained graph (clipping's
        # norm pass) runs this backward twice. A 0-dim fp32 factor keeps the dtypes and is applied in fp32.
        if ctx.keep:  # [vocab, hidden], as QLinear's gy^T @ x over every token
            gw = (saved.t() @ x.to(ctx.cdt)).mul_(grad_loss)
        else:
            gw = saved * grad_loss
        deliver(ctx.weight, gw)  # once per pass, as one QLinear call: one use
        del gw
        return gx * grad_loss, None, None, None, None, None, None, None, None


def _keep_way(x, weight, cdt, targets, scale, chunk: int):
    """The `keep` way's forward: (summed loss, x's gradient, the logits' gradient [n, vocab] in `cdt`).

    W is dequantized a slice of rows at a time (HeadRowSlices), never whole: 2048 tokens of a 128k
    vocabulary otherwise held the bf16 head (0.98 GiB at hidden 4096) beside a chunk's fp32 tensors. Three
    passes over the kept [n, vocab] buffer, which holds the logits first, then their gradient:
    1. the logits in the compute dtype, F.linear's output as the unchunked head's, a slice of W and a chunk
       of tokens at a time;
    2. per chunk of tokens, their fp32 copy, cross-entropy and its gradient (the same ops as the
       unchunked loss on the same values), written over them;
    3. x's gradient gy @ W, a slice of W at a time, summed in fp32 and rounded once to the compute dtype,
       as one matmul's output is (the sum's order differs: fp32 rounding).
    W is dequantized twice in forward instead of once (the backward needs no W: gy^T @ x)."""
    n = x.shape[0]
    xc = x.to(cdt)
    gy_all = x.new_empty((n, weight.shape[0]), dtype=cdt)
    head = HeadRowSlices(weight, cdt)

    def project(rows, w):  # a chunk of tokens at a time: the product's temporary is [chunk, slice rows]
        for i in range(0, n, chunk):
            gy_all[i:i + chunk, rows] = F.linear(xc[i:i + chunk], w)

    head.each(project)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for i in range(0, n, chunk):
        loss, g = _chunk_loss(gy_all[i:i + chunk], targets[i:i + chunk], scale, True)
        total += loss
        gy_all[i:i + chunk].copy_(g)  # QLinear's backward takes the logits' gradient in the compute dtype too
        del g
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    head.each(lambda rows, w: add_mm_fp32(gx, gy_all[:, rows], w))
    return total, gx.to(cdt).to(x.dtype), gy_all


def _chunk_loss(logits, targets, scale, want_grad: bool):
    """A chunk's summed cross-entropy over its logits taken to fp32 (as ForCausalLMLoss), detached, and the
    fp32 gradient of `scale` times it with respect to those logits (None without grad). The fp32 logits
    and the loss's graph are gone on return: only the gradient is alive."""
    with torch.enable_grad():
        logits = logits.float().requires_grad_(want_grad)
        loss = F.cross_entropy(logits, targets, reduction="sum")
        grad = torch.autograd.grad(loss, logits, scale)[0] if want_grad else None
    return loss.detach(), grad


# bytes of one dequantized slice of the head in the keep way: a 128k x 4096 bf16 head in 16 slices
HEAD_SLICE_BYTES = 64 * 2**20


class HeadRowSlices:
    """The HybridWeight `weight` dequantized to `dtype` a slice of rows at a time: `each(fn)` calls fn(row
    slice, W[rows]) per slice, W[rows] made with the same kernel and so the same values as
    weight.dequantize(dtype)[rows], and freed before the next is made (a loop variable would hold it while
    the next is dequantized). The int8 state is read once (ZeRO-3 gathers it once, as for one dequantize,
    and holds it while this object lives) and may be passed over again. A slice starts and ends on an int8
    group boundary (groups may run across rows: hybrid.choose_group) and holds about `slice_bytes`."""

    def __init__(self, weight, dtype: torch.dtype, slice_bytes: int | None = None):
        from qft_ds import ops
        slice_bytes = slice_bytes or HEAD_SLICE_BYTES
        self.rows, self.cols = weight.shape
        self.group, self.dtype = weight.group, dtype
        self.codes, self.scales, self.outlier_idx, self.outlier_val = weight.full_state()
        step = self.group // math.gcd(self.cols, self.group)  # rows per slice: a multiple of this
        self.per = max(step, slice_bytes // (self.cols * dtype.itemsize) // step * step)
        self.starts = list(range(0, self.rows, self.per))
        self.flat = [a * self.cols for a in self.starts] + [self.rows * self.cols]
        # each slice's outliers (their flat indices are sorted): one host sync for every cut
        self.cuts = torch.searchsorted(self.outlier_idx, torch.tensor(
            self.flat, dtype=self.outlier_idx.dtype, device=self.outlier_idx.device)).tolist()
        self._dequantize = ops.current(self.codes.device).dequantize_hybrid

    def each(self, fn) -> None:
        g = self.group
        for k, a in enumerate(self.starts):
            lo, hi, c0, c1 = self.flat[k], self.flat[k + 1], self.cuts[k], self.cuts[k + 1]
            w = self._dequantize(self.codes[lo:hi], self.scales[lo // g:-(-hi // g)], g,
                                 self.outlier_idx[c0:c1] - lo, self.outlier_val[c0:c1], self.dtype)
            fn(slice(a, min(a + self.per, self.rows)), w.view(-1, self.cols))
            del w


def add_mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 products and accumulation, for fp32 or bf16 a, b, in place. CUDA
    multiplies bf16 at bf16 speed into fp32 (addmm's out_dtype); the CPU has no such kernel and multiplies
    fp32 copies of the [chunk, *] operands."""
    if a.dtype == torch.float32 or not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def keeps_logits_grad(tokens: int, hidden: int, cdt: torch.dtype) -> bool:
    """Whether the logits' gradient of `tokens` tokens in `cdt` ([tokens, vocab]) costs fewer bytes than an
    fp32 sum of the head's gradient ([vocab, hidden]): _ChunkedHeadLoss's `keep` way, else `sum`."""
    return tokens * cdt.itemsize < hidden * 4


def chunked_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor | None, head: nn.Module, chunk: int,
                           num_items_in_batch=None, shift_labels: torch.Tensor | None = None,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF's causal-LM loss of `head(hidden)` against `labels` (shifted here) or `shift_labels` (already
    shifted), with at most `chunk` tokens' logits alive at once. `head` is a converted QLinear."""
    _check_head(head)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"chunked_loss: {targets.shape[0]} labels for {flat.shape[0]} hidden states")
    keep = (targets != ignore_index).nonzero().squeeze(1)  # one host sync: the chunk loop needs the count
    if num_items_in_batch is None:
        denom = torch.tensor(float(keep.numel()), device=hidden.device)  # 0 tokens: 0/0 = nan, as HF's mean
    else:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.qweight.anchor.requires_grad)
    keep_grad = keeps_logits_grad(keep.numel(), flat.shape[-1], head.compute_dtype)
    return _ChunkedHeadLoss.apply(flat.index_select(0, keep), head.qweight.anchor, head.qweight,
                                  head.compute_dtype, targets.index_select(0, keep), denom, chunk, want_grad,
                                  keep_grad)


def _check_head(head: nn.Module) -> None:
    from qft_ds.nn.qmodules import QLinear
    if not isinstance(head, QLinear):
        raise ValueError(f"qft.chunked_loss needs the LM head converted to int8 (QLinear), got "
                         f"{type(head).__name__}")
    if head.fused is not None or head.bias is not None:
        raise ValueError("qft.chunked_loss supports an LM head without bias that is not fused with other "
                         "projections")


def install_chunked_loss(model: nn.Module, chunk: int) -> nn.Module:
    """Wrap `model.forward` (once) so that a call with labels computes the loss chunk by chunk (module
    docstring). Raises for a model whose head or loss the chunked loss would not reproduce."""
    if chunk < 1:
        raise ValueError(f"qft.chunked_loss must be >= 1 tokens per chunk to install it, got {chunk}")
    if getattr(model.forward, "_qft_chunked_loss", None) is not None:
        model.forward._qft_chunked_loss = chunk
        return model
    name = type(model).__name__
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or decoder is model or head is None:
        raise ValueError(f"qft.chunked_loss needs a causal LM with a decoder and an LM head (get_decoder, "
                         f"get_output_embeddings); {name} has not")
    _check_head(head)
    forward = model.forward
    params = inspect.signature(forward).parameters
    if "logits_to_keep" not in params or "labels" not in params:
        raise ValueError(f"qft.chunked_loss: {name}.forward takes no logits_to_keep/labels argument")
    config = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"qft.chunked_loss: {name} transforms its logits after the head ({attr}="
                             f"{getattr(config, attr)}), which the chunked loss does not; set chunked_loss 0")
    loss_name = getattr(getattr(model, "loss_function", None), "__name__", None)
    if loss_name != "ForCausalLMLoss":
        raise ValueError(f"qft.chunked_loss reproduces HF's ForCausalLMLoss; {name} uses {loss_name}")
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def chunked_forward(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        labels = call.arguments.get("labels")
        if labels is None or "fused_lm_head" in kwargs:  # no loss asked (or TRL's own fused head): as before
            return forward(*args, **kwargs)
        if call.arguments.get("logits_to_keep", 0) not in (0, None):
            raise ValueError("qft.chunked_loss: a call with labels and logits_to_keep; pass one of them")
        loss_kwargs = call.arguments.get("kwargs", {})
        # no position kept: the head projects [batch, 0, hidden] (it still dequantizes once, unused)
        call.arguments["labels"] = None
        call.arguments["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=labels.device)
        caught = []
        hook = decoder.register_forward_hook(lambda m, i, out: caught.append(out[0]))
        try:
            out = forward(*call.args, **call.kwargs)
        finally:
            hook.remove()
        if len(caught) != 1 or not hasattr(out, "logits"):
            raise RuntimeError(f"qft.chunked_loss: {name}'s decoder ran {len(caught)} times in one forward, or "
                               "the output is a tuple (return_dict=False); call with return_dict=True")
        loss = chunked_causal_lm_loss(
            caught[0], labels, head, chunked_forward._qft_chunked_loss,
            num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
            shift_labels=loss_kwargs.get("shift_labels"), ignore_index=loss_kwargs.get("ignore_index", IGNORE_INDEX))
        # no logits field: the caller gets the loss (an empty logits tensor would only mislead)
        return type(out)(**{**{k: v for k, v in out.items() if k != "logits"}, "loss": loss})

    chunked_forward._qft_chunked_loss = chunk
    model.forward = chunked_forward
    return model
