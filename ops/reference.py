"""PyTorch reference of every qft_ds kernel: the maths lives here, once.

All tensors are flat (1-D). A block of `block` consecutive elements shares one fp32 scale
`s = absmax / 127`, codes are symmetric int8 in [-127, 127], and the last block may be partial.
Device kernels (ops/triton_*.py) must compute the same functions; tests compare them.

Random draws for stochastic rounding are counter-based: element `i` of the global flat space gets a
uniform that depends only on (seed, step, stream, i). Each aligned chunk of RNG_CHUNK elements gets
its own generator keyed by a hash of (seed, step, stream, chunk), so a shard that starts mid-tensor
draws exactly what the unsharded tensor would, and a rerun reproduces bit for bit.
"""
from __future__ import annotations

import torch

from . import reference_rng as rr

QMAX = 127
RNG_CHUNK = 1 << 16
_M64 = (1 << 64) - 1

# Independent random streams inside one optimizer step.
STREAM_WEIGHT = 0
STREAM_MOMENTUM = 1
STREAM_GRAD = 2
STREAM_CARRY = 3  # error feedback's starting carry (drawn once, at conversion)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def rng_key(seed: int, step: int, stream: int) -> int:
    """A 63-bit key for one (seed, step, stream); chunks hash their index into it."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ stream) >> 1


def uniform(key: int, offset: int, n: int, device) -> torch.Tensor:
    """U[0,1) draws for global elements [offset, offset+n) under `key` (fp32)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    pos = 0
    while pos < n:
        g = offset + pos
        chunk, within = divmod(g, RNG_CHUNK)
        take = min(RNG_CHUNK - within, n - pos)
        gen.manual_seed(_splitmix64(key ^ chunk) >> 1)
        if within == 0:
            torch.rand(take, generator=gen, device=device, out=out[pos:pos + take])
        else:  # a shard starting mid-chunk: draw the chunk head too, keep the tail
            out[pos:pos + take] = torch.rand(within + take, generator=gen, device=device)[within:]
        pos += take
    return out


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View a flat tensor as [nblocks, block], zero-padding a partial last block."""
    pad = (-x.numel()) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block)


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def absmax_scales(x: torch.Tensor, block: int, qmax: int = QMAX) -> torch.Tensor:
    return _blocks(x.float(), block).abs().amax(dim=1) / qmax


def round_codes(y: torch.Tensor, rounding: str, key: int | None = None, offset: int = 0,
                qmax: int = QMAX) -> torch.Tensor:
    """Round y (already in units of the scale) to int8 codes in [-qmax, qmax]; 'sr' is unbiased: E[q] = y."""
    if rounding == "sr":
        y = uniform(key, offset, y.numel(), y.device).add_(y).floor_()
    elif rounding in ("rtn", "ef"):
        y = torch.round(y)
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    # Always clamp before the cast: an out-of-range float->int8 cast wraps (200 -> -56).
    return y.clamp_(-qmax, qmax).to(torch.int8)


def quantize_blockwise(x: torch.Tensor, block: int, rounding: str = "rtn", key: int | None = None,
                       offset: int = 0, scales: torch.Tensor | None = None, qmax: int = QMAX):
    """Flat float tensor -> (int8 codes [numel] in [-qmax, qmax], fp32 scales [nblocks]). Scales from
    absmax / qmax unless given."""
    x = x.reshape(-1).float()
    if scales is None:
        scales = absmax_scales(x, block, qmax)
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    y = (_blocks(x, block) * inv[:, None]).reshape(-1)[: x.numel()]
    return round_codes(y, rounding, key, offset, qmax), scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, block: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = codes.numel()
    if n % block == 0 and scales.dtype == torch.float32:
        # One mixed-dtype kernel: int8 * fp32 computed in fp32, written in `dtype` (no temporaries, and
        # ~10 us of launch instead of a Triton launch's ~100 us: the forward is host-bound, NOTES.md)
        out = torch.empty(n, dtype=dtype, device=codes.device)
        torch.mul(codes.reshape(-1, block), scales.view(-1, 1), out=out.view(-1, block))
        return out
    x = _blocks(codes.reshape(-1).to(torch.float32), block) * scales[:, None].float()
    return x.reshape(-1)[:n].to(dtype)


# Lion's momentum: int8 (codes in [-127, 127]) or int4 (codes in [-7, 7], two per byte), blockwise with
# one fp32 scale absmax / qmax per block, always stochastically rounded (an unbiased EMA).
MOMENTUM_BITS = (4, 8)
QMAX4 = 7


def check_momentum_bits(bits) -> None:
    if bits not in MOMENTUM_BITS:
        raise ValueError(f"momentum_bits must be 4 or 8, got {bits!r}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] -> uint8 [ceil(n / 2)]: element 2i in the low nibble, 2i + 1 in the high one,
    two's complement (an all-zero buffer is all-zero codes). Element pairs never straddle a shard: shards
    start on block boundaries and blocks are even."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = (flat.view(-1, 2).to(torch.int32) & 0xF)
    return (nib[:, 0] | (nib[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """pack_int4's inverse: int8 codes [numel]."""
    b = packed.to(torch.int32)
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel]
    return ((nib ^ 8) - 8).to(torch.int8)  # sign-extend the nibble


def quantize_momentum(m: torch.Tensor, block: int, key: int, offset: int, bits: int = 8):
    """Flat fp32 momentum -> (codes, fp32 scales), stochastically rounded under `key` at global `offset`:
    int8 codes [numel] (bits 8) or packed int4 uint8 [ceil(numel / 2)] (bits 4)."""
    check_momentum_bits(bits)
    if bits == 8:
        return quantize_blockwise(m, block, "sr", key, offset)
    codes, scales = quantize_blockwise(m, block, "sr", key, offset, qmax=QMAX4)
    return pack_int4(codes), scales


def momentum_codes(codes: torch.Tensor, numel: int, bits: int = 8) -> torch.Tensor:
    """The momentum's int8 codes [numel], unpacked where int4."""
    check_momentum_bits(bits)
    return codes if bits == 8 else unpack_int4(codes, numel)


def dequantize_momentum(codes: torch.Tensor, scales: torch.Tensor, block: int, numel: int,
                        bits: int = 8) -> torch.Tensor:
    """Flat fp32 momentum [numel] from quantize_momentum's codes and scales."""
    return dequantize_blockwise(momentum_codes(codes, numel, bits), scales, block)


def momentum_at(codes: torch.Tensor, scales: torch.Tensor, block: int, idx: torch.Tensor,
                bits: int = 8) -> torch.Tensor:
    """fp32 momentum at flat indices `idx` (the outliers): a gather, no whole dequantize."""
    check_momentum_bits(bits)
    if bits == 8:
        q = codes[idx]
    else:
        q = (((codes[idx // 2].to(torch.int32) >> ((idx % 2) * 4)) & 0xF) ^ 8) - 8
    return q * scales[idx // block]  # int8/int32 * fp32 -> fp32 in one kernel


def dequantize_hybrid(codes, scales, block, outlier_idx, outlier_val, dtype=torch.float32) -> torch.Tensor:
    """Dense blockwise dequantize, then the exact fp32 outliers written at their (sorted int32) flat
    indices, cast to `dtype`: the hybrid weight as the matmul reads it. Flat out."""
    w = dequantize_blockwise(codes, scales, block, dtype)
    if outlier_idx is not None and outlier_idx.numel():
        w[outlier_idx] = outlier_val.to(dtype)
    return w


def finite_flag(finite: torch.Tensor) -> torch.Tensor:
    """The update-may-be-written flag as a bool tensor: `finite` is a bool flag, or a float (the
    gradient's norm) that must be finite."""
    return torch.isfinite(finite) if finite.is_floating_point() else finite


CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


def clip_scale(grad_scale: float, clip: float, norm: float) -> float:
    """The factor a gradient of norm `norm` gets under a clipping budget `clip` (and an outer
    `grad_scale`): min(grad_scale, clip / (norm + eps)). The kernels compute the same in fp32."""
    return min(grad_scale, clip / (norm + CLIP_EPS))


def lion_step(w_codes, w_scales, w_block, m_codes, m_scales, m_block, grad, *, lr, beta1, beta2,
              weight_decay, rounding, seed, step, offset, outlier_idx=None, outlier_val=None,
              residual=None, grad_scale=1.0, finite=None, clip=0.0, momentum_bits=8, rand_bits=None):
    """One INT8 Lion step on a flat weight (or shard), in place.

    c = b1*m + (1-b1)*g ; w <- w*(1 - lr*wd) - lr*sign(c) ; m <- b2*m + (1-b2)*g

    w is dense int8 on a fixed grid (its scale only grows, when a value outgrows its block: re-rounding
    onto a fresh grid every step would add rounding noise to every element every step). Outliers are
    exact fp32, updated in place; their dense codes stay 0. `residual` (int8, units of s/254) is the
    error-feedback carry when rounding == 'ef'. `offset` is the global element offset of element 0.
    `finite` (a bool tensor, a float tensor that must be finite, e.g. the gradient's norm, or None): if
    not, nothing is written (the GPU kernel masks its stores; here one host sync is cheap next to the rest).
    `clip` > 0 (a clipping budget): the gradient is scaled by clip_scale(grad_scale, clip, finite), where
    `finite` must then be the gradient's fp32 norm; the kernels compute that scale on the device, so the
    fused flow clips each tensor without a host sync.
    `momentum_bits` 4: m_codes are packed int4 (quantize_momentum), drawn under the same key and offsets.
    `rand_bits` (16, 32 or 8): round as the Triton kernels do with that many random bits per element, from
    their Philox stream (reference_rng.py: the same bits, the kernels' SR scales); None: this module's
    own generator (uniform), the default.
    """
    check_momentum_bits(momentum_bits)
    if rand_bits is not None:
        rr.check_rand_bits(rand_bits)
    if finite is not None and not bool(finite_flag(finite)):
        return
    g = grad.reshape(-1).float()
    if clip > 0:
        grad_scale = clip_scale(grad_scale, clip, float(finite))
    if grad_scale != 1.0:
        g = g * grad_scale
    m = dequantize_momentum(m_codes, m_scales, m_block, w_codes.numel(), momentum_bits)
    u = torch.lerp(m, g, 1 - beta1).sign_()  # sign(b1*m + (1-b1)*g)
    m.lerp_(g, 1 - beta2)                     # b2*m + (1-b2)*g
    if rand_bits is None:
        mq, ms = quantize_momentum(m, m_block, rng_key(seed, step, STREAM_MOMENTUM), offset, momentum_bits)
    else:  # the kernels' stream: one draw per element under the weight stream's key feeds both roundings
        hw, hm = rr.shares(rr.draws(rng_key(seed, step, STREAM_WEIGHT), offset, m.numel(), rand_bits,
                                           m.device), rand_bits)
        ms = rr.sr_scales(_blocks(m, m_block).abs().amax(dim=1), QMAX if momentum_bits == 8 else QMAX4)
        mq = rr.sr_codes(m, rr.sr_inverse(ms).repeat_interleave(m_block)[: m.numel()], hm)
        mq = mq if momentum_bits == 8 else pack_int4(mq)
    m_codes.copy_(mq)
    m_scales.copy_(ms)
    del m, mq

    w = dequantize_blockwise(w_codes, w_scales, w_block)
    if residual is not None:
        w.add_(dequantize_blockwise(residual, w_scales / 254.0, w_block))
    w.mul_(1 - lr * weight_decay).sub_(u, alpha=lr)
    has_outliers = outlier_idx is not None and outlier_idx.numel() > 0
    if has_outliers:
        outlier_val.mul_(1 - lr * weight_decay).sub_(u[outlier_idx], alpha=lr)
    # As in the kernels (no select before their absmax, for speed): an outlier slot's dense value (code 0,
    # so -lr*u) takes part in its group's new scale; its code and carry are zeroed after rounding.
    key = rng_key(seed, step, STREAM_WEIGHT)
    if rand_bits is not None and rounding == "sr":  # the kernels' integer SR, at their scale
        new_scales = torch.maximum(w_scales, rr.sr_scales(_blocks(w, w_block).abs().amax(dim=1), QMAX))
        inv = rr.sr_inverse(new_scales).repeat_interleave(w_block)[: w.numel()]
        q = rr.sr_codes(w, inv, hw)
    else:
        new_scales = torch.maximum(w_scales, absmax_scales(w, w_block))
        inv = torch.where(new_scales > 0, 1.0 / new_scales, torch.zeros_like(new_scales))
        y = (_blocks(w, w_block) * inv[:, None]).reshape(-1)[: w.numel()]
        q = round_codes(y, rounding, key, offset)
    if residual is not None:  # the carry, stochastically rounded: unbiased at any lr (see triton_kernels._ef_carry)
        if rand_bits is None:
            residual.copy_(round_codes((y - q.float()) * 254.0, "sr", key, offset))
        else:
            residual.copy_(rr.sr_codes((y - q.float()) * 254.0, torch.tensor(2.0**rr.SR_SHIFT), hw))
    if has_outliers:
        q[outlier_idx.long()] = 0
        if residual is not None:
            residual[outlier_idx.long()] = 0
    w_codes.copy_(q)
    w_scales.copy_(new_scales)


def lion_step_fp32(param, momentum, grad, *, lr, beta1, beta2, weight_decay, grad_scale=1.0):
    """Plain fp32 Lion, in place: the float parameters' update and the tests' reference."""
    g = grad.float() * grad_scale if grad_scale != 1.0 else grad.float()
    u = torch.sign(momentum.mul(beta1).add_(g, alpha=1 - beta1))
    param.mul_(1 - lr * weight_decay).sub_(u.to(param.dtype), alpha=lr)
    momentum.mul_(beta2).add_(g, alpha=1 - beta2)


def lion_step_fp32_foreach(params, momenta, grads, *, lr, beta1, beta2, weight_decay, grad_scale=1.0):
    """lion_step_fp32 over lists of tensors (one param group), in place, with torch._foreach ops: eight
    launches for all the norms and biases of a model instead of seven per tensor (the training step is
    host-bound, bench/NOTES.md). The same arithmetic, so the same bits (tested)."""
    if not params:
        return
    g = [x.float() for x in grads]  # no copy for fp32 gradients
    if grad_scale != 1.0:
        g = torch._foreach_mul(g, grad_scale)
    u = torch._foreach_mul(momenta, beta1)
    torch._foreach_add_(u, g, alpha=1 - beta1)
    torch._foreach_sign_(u)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_sub_(params, u, alpha=lr)
    torch._foreach_mul_(momenta, beta2)
    torch._foreach_add_(momenta, g, alpha=1 - beta2)
