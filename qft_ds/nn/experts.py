"""Mixture-of-Experts experts stored as 3-D Parameters, quantized one expert slice at a time.

transformers (>= 5) keeps each MoE layer's experts as `gate_up_proj` [E, 2I, H] (or `up_proj`) and
`down_proj` [E, H, I] Parameters of one module (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS stored
transposed, ...), decorated by `use_experts_implementation`, whose forward dispatches to an eager loop,
`batched_mm` or `grouped_mm`. QExperts replaces such a module:

- every expert slice (`gate_up_proj[e]`, `down_proj[e]`, in the layout it is stored in) is its own
  HybridWeight: int8 + fp32 outliers, its own Lion momentum, its own stochastic-rounding offsets;
- forward dequantizes only the experts that received tokens, one at a time, and frees each;
- one autograd node per call (`_ExpertsFn`) saves only its inputs (hidden states and routing, like an
  activation-checkpointed block) and, in backward, recomputes one expert at a time, hands that expert's
  two weight gradients to the flow and frees them. Every expert delivers a gradient on every backward, in
  a fixed order (last expert first, `down_proj` before `gate_up_proj`), zeros for an expert without tokens:
  fp32 Lion on the 3-D Parameter updates unused experts too (momentum, weight decay), and ranks that routed
  differently still meet at the same collectives in the same order (ZeRO reduce-scatters per weight).

The router is not touched: it stays an exact fp32 Parameter (qft_ds.nn.coverage lists it). Top-k routing is
discontinuous, int8 noise in the router logits would flip tokens to other experts, and the router is E x H,
a rounding error in memory.

Biases (GPT-OSS's [E, out]), a post-expert norm and the gating function (`_apply_gate`: SwiGLU, GPT-OSS's
clamped interleaved GLU) are taken over from the original module, so its maths is reused, not rewritten;
`classify` checks on a probe that QExperts' maths gives the original's output before converting.
"""
from __future__ import annotations

import inspect
import itertools

import torch
from torch import nn

from qft_ds.flow import deliver
from qft_ds.quant.hybrid import HybridWeight

EXPERTS = "experts"


def _weight_names(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """A module made by transformers' `use_experts_implementation` (its flags are set by that decorator), not
    yet converted."""
    return not isinstance(module, QExperts) and all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts", "config"))


@torch.no_grad()
def classify(module: nn.Module):
    """(EXPERTS, None) for an experts module QExperts reproduces; (KEPT reason) with `kept` for one it does
    not; None for any other module."""
    from qft_ds.nn.adapters import KEPT
    if not is_experts_module(module):
        return None
    what = f"{type(module).__name__} (MoE experts)"
    if getattr(module, "_is_expert_parallel", False):
        return KEPT, f"{what} is sharded by expert parallelism, which qft_ds does not support"
    names = _weight_names(module)
    params = dict(module.named_parameters(recurse=False))
    for n in names:
        p = params.get(n)
        if p is None or p.dim() != 3 or not p.is_floating_point() or p.shape[0] != module.num_experts:
            return KEPT, f"{what}: '{n}' is not a 3-D float Parameter with one slice per expert"
    other = [n for n, p in params.items() if p.dim() >= 3 and n not in names]
    if other:
        return KEPT, f"{what} has other expert Parameters ({', '.join(other)}) QExperts does not read"
    try:
        err = _probe(module)
    except Exception as e:  # a forward QExperts' maths cannot follow
        return KEPT, f"{what}: QExperts cannot reproduce its forward ({type(e).__name__}: {e})"
    if err > 1e-4:
        return KEPT, f"{what}: QExperts' maths differs from its forward on a probe (relative error {err:.1e})"
    return EXPERTS, None


def _hidden_size(module: nn.Module) -> int:
    down = getattr(module, "down_proj")
    return down.shape[2] if module.is_transposed else down.shape[1]


def _probe(module: nn.Module) -> float:
    """Relative error of QExperts' maths (on the module's own fp32 weights) against its forward."""
    gen = torch.Generator().manual_seed(0)
    w = getattr(module, "down_proj")
    n, e = 7, module.num_experts
    k = min(2, e)
    hidden = torch.randn(n, _hidden_size(module), generator=gen).to(w.device, w.dtype)
    index = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]).to(w.device)
    routing = torch.rand(n, k, generator=gen).softmax(-1).to(w.device, w.dtype)
    want = module(hidden, index, routing)
    slices = {name: getattr(module, name) for name in _weight_names(module)}
    got = _forward(module, hidden, index, routing, lambda name, i: slices[name][i], w.dtype)
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool, cdt: torch.dtype) -> torch.Tensor:
    """x @ W^T for a slice stored [out, in], x @ W for one stored transposed [in, out] (GPT-OSS); out in x's
    dtype, or in the compute dtype under autocast (as qft_ds.nn.precision.linear_in)."""
    y = x.to(cdt) @ (w if transposed else w.t())
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def _expert(module, x, w1, w2, b1, b2, cdt) -> torch.Tensor:
    """One expert's output (before the routing weight) for its tokens x, from its weights w1 (gate_up or up)
    and w2 (down) and their bias rows b1, b2 (or None): the decorator's forward, one expert."""
    y = _matmul(x, w1, module.is_transposed, cdt)
    if b1 is not None:
        y = y + b1.to(y.dtype)
    h = module._apply_gate(y) if module.has_gate else module.act_fn(y)
    o = _matmul(h, w2, module.is_transposed, cdt)
    if b2 is not None:
        o = o + b2.to(o.dtype)
    if getattr(module, "has_post_expert_norm", False):
        o = module.post_expert_norm(o)
    return o


def _routes(index: torch.Tensor, num_experts: int):
    """(token of each routed slot, its top-k position, slots sorted by expert, tokens per expert as a list):
    one host sync per call."""
    k = index.shape[-1]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    return order // k, order % k, counts


def _biases(module, e: int):
    if not module.has_bias:
        return None, None
    w1, w2 = _weight_names(module)
    return getattr(module, f"{w1}_bias")[e], getattr(module, f"{w2}_bias")[e]


def _forward(module, hidden, index, routing, weight_of, cdt, every_expert: bool = False) -> torch.Tensor:
    """The experts' output for hidden [T, H] routed by index/routing [T, k]; `weight_of(name, e)` gives
    expert e's slice of weight `name` (dequantized once, dropped after the expert). `every_expert`: ask for
    the weights of experts without tokens too (ZeRO-3: each is a gather every rank must make)."""
    out = torch.zeros_like(hidden)
    token, kpos, counts = _routes(index, module.num_experts)
    w1n, w2n = _weight_names(module)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            if every_expert:
                weight_of(w1n, e), weight_of(w2n, e)
            continue
        tok, pos = token[start:start + n], kpos[start:start + n]
        start += n
        b1, b2 = _biases(module, e)
        o = _expert(module, hidden[tok], weight_of(w1n, e), weight_of(w2n, e), b1, b2, cdt)
        out.index_add_(0, tok, (o * routing[tok, pos, None].to(o.dtype)).to(out.dtype))
    return out


def _sharded(w: HybridWeight) -> bool:
    """ZeRO-3 holds a slice of `w` here: every dequantize is a collective, so every rank must make it."""
    return getattr(w, "_gather", None) is not None


class _ExpertsFn(torch.autograd.Function):
    """All experts of one call, one autograd node; see the module docstring. Inputs after the routing:
    the module, how many float parameters follow (biases, a post norm's: their gradients go back to autograd),
    those, then every slice's anchor (they make autograd run this backward; the slices' gradients go to the
    flow, never to autograd). Only hidden states and routing are saved; the module's float parameters are
    read again in backward (they change only at step(), after backward)."""

    @staticmethod
    def forward(ctx, hidden, index, routing, module, n_float, *params):
        ctx.module, ctx.n_float = module, n_float
        dev = hidden.device.type  # backward recomputes under the forward's autocast state (bf16 compute)
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(hidden, index, routing)
        return module.run(hidden, index, routing)

    @staticmethod
    def backward(ctx, grad_out):
        module = ctx.module
        hidden, index, routing = ctx.saved_tensors
        need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_x = torch.zeros_like(hidden) if need_x else None
        grad_r = torch.zeros_like(routing) if need_r else None
        floats = [p for _, p in module.float_params()]
        grad_f = [torch.zeros_like(p) if need else None for p, need in zip(floats, ctx.needs_input_grad[5:])]
        token, kpos, counts = _routes(index, module.num_experts)
        starts = [0, *itertools.accumulate(counts)]
        for e in reversed(range(module.num_experts)):  # a fixed order: every rank delivers alike
            tok, pos = token[starts[e]:starts[e + 1]], kpos[starts[e]:starts[e + 1]]
            _backward_expert(module, e, hidden[tok], routing[tok, pos], grad_out[tok], floats, grad_f,
                             need_x, need_r, tok, grad_x, pos, grad_r, ctx.autocast)
        return (grad_x, None, grad_r, None, None, *grad_f, *([None] * (len(ctx.needs_input_grad) - 5 - len(floats))))


def _backward_expert(module, e, x, r, gy, floats, grad_f, need_x, need_r, tok, grad_x, pos, grad_r,
                     autocast) -> None:
    """Expert e's backward: recompute its output for its tokens, hand its two weight gradients to the flow
    (down first, as a layer-by-layer backward would), add its input, routing and float gradients."""
    cdt = module.compute_dtype
    w1n, w2n = _weight_names(module)
    q1, q2 = module.slice(w1n, e), module.slice(w2n, e)
    if len(tok) == 0:  # no tokens: a zero gradient (fp32 Lion on the 3-D Parameter also steps unused experts)
        if _sharded(q1):  # the gathers are collectives: make them as every rank does
            q1.dequantize(cdt), q2.dequantize(cdt)
        deliver(q2, torch.zeros(q2.shape, dtype=cdt, device=x.device))
        deliver(q1, torch.zeros(q1.shape, dtype=cdt, device=x.device))
        return
    bias_pos = module.bias_positions()
    dev, on, dtype = autocast
    with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=on):
        x = x.detach().requires_grad_(need_x)
        r = r.detach().requires_grad_(need_r)
        w1 = q1.dequantize(cdt).requires_grad_()
        w2 = q2.dequantize(cdt).requires_grad_()
        b1 = b2 = None
        if bias_pos is not None:  # expert e's rows, as leaves: the gradient of the whole [E, out] is mostly 0
            b1 = floats[bias_pos[0]][e].detach().requires_grad_(grad_f[bias_pos[0]] is not None)
            b2 = floats[bias_pos[1]][e].detach().requires_grad_(grad_f[bias_pos[1]] is not None)
        y = _expert(module, x, w1, w2, b1, b2, cdt) * r[:, None]
        others = [(i, p) for i, p in enumerate(floats) if grad_f[i] is not None
                  and (bias_pos is None or i not in bias_pos)]  # a post norm's weight, used as it is
        leaves = [w2, w1] + [t for t in (x, r, b1, b2) if t is not None and t.requires_grad] + [p for _, p in others]
        grads = torch.autograd.grad(y, leaves, gy.to(y.dtype), allow_unused=True)
    got = {id(t): g for t, g in zip(leaves[2:], grads[2:])}
    g2, g1 = grads[:2]  # w2, w1: always used
    del y, w1, w2, grads, leaves
    deliver(q2, g2)
    del g2
    deliver(q1, g1)
    del g1
    if need_x:
        grad_x.index_add_(0, tok, got[id(x)].to(grad_x.dtype))
    if need_r:
        grad_r[tok, pos] = got[id(r)].to(grad_r.dtype)
    for b, i in (((b1, bias_pos[0]), (b2, bias_pos[1])) if bias_pos is not None else ()):
        if got.get(id(b)) is not None:
            grad_f[i][e] += got[id(b)]
    for i, p in others:
        if got.get(id(p)) is not None:
            grad_f[i] += got[id(p)]


class QExperts(nn.Module):
    """A transformers experts module over one HybridWeight per expert slice (module docstring). It keeps the
    original's other parameters, submodules and attributes under their names (biases, act_fn, a post norm,
    GPT-OSS's swiglu limits), so exports write them where transformers reads them."""

    def __init__(self, source: nn.Module, slices: dict[str, list[HybridWeight]],
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        for k, v in vars(source).items():  # plain attributes: flags, sizes, config, gating constants
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        for name, child in source.named_children():
            self.add_module(name, child)
        for name, p in source.named_parameters(recurse=False):
            if name not in slices:
                self.register_parameter(name, p)
        for name, b in source.named_buffers(recurse=False):
            self.register_buffer(name, b)
        for name, ws in slices.items():
            if len(ws) != self.num_experts:
                raise ValueError(f"{name}: {len(ws)} slices for {self.num_experts} experts")
            for w in ws:
                w.n_uses += 1
            setattr(self, name, nn.ModuleList(ws))
        self.source_class = type(source).__name__
        self._gate_fn = getattr(type(source), "_apply_gate", None)
        args = list(inspect.signature(type(source).forward).parameters)[1:4]
        self._arg_names = args  # hidden states, expert indices, routing weights, as the source names them
        self.compute_dtype = compute_dtype

    def _apply_gate(self, y: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, y)

    def slice(self, name: str, e: int) -> HybridWeight:
        return getattr(self, name)[e]

    def slices(self):
        """(weight name, expert, HybridWeight) in conversion order."""
        for name in _weight_names(self):
            for e, w in enumerate(getattr(self, name)):
                yield name, e, w

    def bias_positions(self):
        if not self.has_bias:
            return None
        names = [n for n, _ in self.float_params()]
        return tuple(names.index(f"{w}_bias") for w in _weight_names(self))

    def float_params(self):
        """(name, Parameter) of everything trained in fp32 here: biases, a post norm's weight."""
        return [(n, p) for n, p in self.named_parameters() if getattr(p, "_qft_weight", None) is None]

    def forward(self, *args, **kwargs):
        bound = dict(zip(self._arg_names, args))
        bound.update(kwargs)
        hidden, index, routing = (bound[n] for n in self._arg_names)
        anchors = [w.anchor for _, _, w in self.slices()]
        if not torch.is_grad_enabled():
            return self.run(hidden, index, routing)
        floats = [p for _, p in self.float_params()]
        return _ExpertsFn.apply(hidden, index, routing, self, len(floats), *floats, *anchors)

    def run(self, hidden, index, routing) -> torch.Tensor:
        """The output, dequantizing the routed experts only (every expert under ZeRO-3, in the same order on
        every rank)."""
        cdt = self.compute_dtype
        return _forward(self, hidden, index, routing, lambda name, e: self.slice(name, e).dequantize(cdt), cdt,
                        every_expert=_sharded(self.slice(_weight_names(self)[0], 0)))

    def extra_repr(self) -> str:
        return (f"{self.source_class}: num_experts={self.num_experts}, weights={list(_weight_names(self))}, "
                f"transposed={self.is_transposed}, bias={self.has_bias}, compute_dtype={self.compute_dtype}")


@torch.no_grad()
def quantize(source: nn.Module, group_size: int, outlier_frac: float, offset: int, error_feedback: bool = False,
             device=None, compute_dtype: torch.dtype = torch.float32, on_weight=None) -> QExperts:
    """A QExperts over `source`'s slices, quantized one at a time (on `device` if given) at global offsets from
    `offset` on, in `slices()` order; `on_weight(w)` runs on each slice as it is made (as convert_model's).
    Changes nothing in `source`."""
    slices = {}
    for name in _weight_names(source):
        param = getattr(source, name)
        if param.is_meta:
            raise ValueError(f"{type(source).__name__}.{name} is on the meta device: conversion needs the experts' "
                             "weights loaded (streaming conversion does not read MoE experts)")
        ws = []
        for e in range(source.num_experts):
            piece = param[e].detach() if device is None else param[e].detach().to(device)
            w = HybridWeight(piece, group_size, outlier_frac, global_offset=offset)
            if error_feedback:
                w.start_carry(piece)
            if on_weight is not None:
                on_weight(w)
            offset += w.numel
            ws.append(w)
        slices[name] = ws
    return QExperts(source, slices, compute_dtype)


def layout_entries(model: nn.Module, prefix_of: dict) -> dict:
    """{HybridWeight prefix: [the 3-D Parameter's state-dict name, expert, number of experts]} for every
    QExperts slice (the layout's "expert" entry: exports stack the slices back into that Parameter)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QExperts):
            for wname, e, w in m.slices():
                out[prefix_of[id(w)]] = [f"{name}.{wname}" if name else wname, e, m.num_experts]
    return out


def stack(slices: list) -> dict:
    """[(layout "expert" entry, dense slice), ...] -> {Parameter name: [E, ...] tensor}; every expert of a
    Parameter must be there."""
    by_param: dict[str, dict] = {}
    count = {}
    for (name, e, n), w in slices:
        by_param.setdefault(name, {})[e] = w
        count[name] = n
    out = {}
    for name, parts in by_param.items():
        missing = sorted(set(range(count[name])) - set(parts))
        if missing:
            raise ValueError(f"experts weight '{name}' lacks the slices of experts {missing[:5]}")
        out[name] = torch.stack([parts[e] for e in range(count[name])])
    return out
