"""The causal-LM loss with the LM head's logits made a chunk of tokens at a time (`"qft": {"chunked_loss": N}`).

At a 128k vocabulary the fp32 logits [tokens, vocab] and their gradient outweigh every other activation
(2048 tokens: 1.05 GB each, more with the loss's temporaries). Here they exist N tokens at a time, in
forward only: the loss is a scalar, so forward computes its gradients too, chunk by chunk, and backward
only scales them (no logits recomputed).

How it hooks in (install_chunked_loss): the model's forward, called with labels, runs with labels=None and
`logits_to_keep` an empty index (its head projects no position), a forward hook on the decoder catches the
last hidden state (what the head would read), and the loss is computed here. The output carries the loss
and no logits. Calls without labels are untouched.

The loss is HF's ForCausalLMLoss: labels shifted by one, -100 ignored, mean over the other tokens (or sum /
`num_items_in_batch` when the trainer passes it). Ignored tokens are dropped before the head: they add
nothing to the loss or to any gradient.

The head's weight gradient: QLinear delivers one gradient per matmul to the flow, and the fused flow
updates a weight when all its uses have delivered. Per chunk deliveries would update after the first
chunk, so `_ChunkedHeadLoss` does the head's matmuls itself, dequantizes the int8 weight once (not per
chunk), sums the chunks' weight gradients in fp32, rounds once to the compute dtype (as the unchunked
matmul does) and delivers in backward, once, like one QLinear call. Against the unchunked loss: each token's logits,
loss and input gradient come from the same ops; the loss and the weight gradient are summed in another
order, so they agree to fp32 rounding (tests/nn/test_chunked_loss.py).
"""
from __future__ import annotations

import functools
import inspect

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
    forward computes them chunk by chunk (no logits recomputed in backward, as a fused linear cross-entropy
    does) and keeps x's gradient [n, hidden] (x's dtype) and W's [vocab, hidden] (the compute dtype);
    backward scales them and delivers W's. Without grad (evaluation) it computes the loss only. W's gradient is needed at the start of backward anyway, with every activation
    still alive, so holding it from the end of forward adds nothing to the peak."""

    @staticmethod
    def forward(ctx, x, anchor, weight, cdt, targets, denom, chunk: int, want_grad: bool):
        w = weight.dequantize(cdt)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        # each token's loss gets the upstream gradient / count from the mean's backward: the same division
        scale = 1.0 / denom
        gx = torch.empty_like(x) if want_grad else None
        # W's gradient is summed in fp32 from fp32 products, then rounded once to the compute dtype, as the
        # unchunked matmul (fp32 accumulation inside) rounds once: a bf16 sum, or bf16 partials, would add a
        # bf16 rounding per chunk. Costs an fp32 [vocab, hidden] for the duration of the loss.
        gw = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if want_grad else None
        for i in range(0, x.shape[0], chunk):
            xc = x[i:i + chunk].to(cdt)
            with torch.enable_grad():
                logits = F.linear(xc, w).float().requires_grad_(want_grad)  # as ForCausalLMLoss: fp32
                loss = F.cross_entropy(logits, targets[i:i + chunk], reduction="sum")
                total += loss.detach()
                if not want_grad:
                    continue
                (gy,) = torch.autograd.grad(loss, logits, scale)
            gy = gy.to(cdt)  # QLinear's backward takes the logits' gradient in the compute dtype too
            del logits, loss
            gx[i:i + chunk] = (gy @ w).to(x.dtype)
            add_mm_fp32(gw, gy.t(), xc)
        if want_grad:
            del w  # before the rounded copy: the fp32 sum and one [vocab, hidden] in the compute dtype at a time
            ctx.save_for_backward(gx, gw.to(cdt))
        ctx.weight = weight
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw = ctx.saved_tensors
        # fresh tensors: the flow may sum into or sanitise what it gets, and a retained graph (clipping's
        # norm pass) runs this backward twice
        # (a 0-dim fp32 factor keeps the tensors' dtypes and is applied in fp32)
        deliver(ctx.weight, gw * grad_loss)  # once per pass, as one QLinear call: one use
        return gx * grad_loss, None, None, None, None, None, None, None


def add_mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 products and accumulation, for fp32 or bf16 a, b, in place. CUDA
    multiplies bf16 at bf16 speed into fp32 (addmm's out_dtype); the CPU has no such kernel and multiplies
    fp32 copies of the [chunk, *] operands."""
    if a.dtype == torch.float32 or not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


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
    return _ChunkedHeadLoss.apply(flat.index_select(0, keep), head.qweight.anchor, head.qweight,
                                  head.compute_dtype, targets.index_select(0, keep), denom, chunk, want_grad)


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
