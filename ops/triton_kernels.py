"""Triton kernels. Each computes the same function as its twin in reference.py (tests compare them).

Random bits and stochastic rounding live in triton_rng.py (Philox, RAND_BITS, the integer SR), the momentum's
int8/int4 storage in triton_momentum.py. The Lion
kernels draw once per element for both of its roundings (weight and momentum), and the CPU reference
uses another generator by default: the two agree in distribution, not bit for bit; with an explicit
`rand_bits` the reference draws the kernels' Philox stream (reference_rng.py) and they agree up to rare
float-rounding flips (tested).

The Lion kernel is issue-bound on the H100 (fewer Philox rounds made it faster; a variant that built
floats from int8 codes and random bits by bit tricks, fewer conversions but more instructions, was slower:
0.153 against 0.139 ms), so its arithmetic is written for the fewest SASS instructions per element
(bench/kernel_sass.py counts them). On the H200 Nsight Compute found it also short of warps (register-
limited occupancy, 31%) and stalled at barriers: lion_kernel_3d's tile order and statement order fix
both (bench/NOTES.md).
"""
import triton
import triton.language as tl
from triton.language import core as tlc  # to_tensor: triton 3.6 has it only here

from .triton_momentum import (SR_PER_QMAX4, _load_m, _load_m4_tile, _m_scale, _store_m,  # noqa: F401
                              _store_m4_sr_tile, _store_m4_tile)
from .triton_rng import (INTERPRETED, SR_MAGIC, SR_PER_QMAX, SR_UNIT, _bits, _bits_3d, _bits_rows,  # noqa: F401
                         _mulhilo, _philox, _rcp, _shares, _sr_codes, _sr_codes4, _sr_inv, _sr_sum, _tile_groups,
                         _uniform)

SR, RTN, EF = 0, 1, 2


@triton.jit
def _load_ok(ok_ptr, OK_FLOAT: tl.constexpr):
    """1 if the update may be written: a bool flag, or (OK_FLOAT) a value that must be finite, e.g. the
    gradient's norm, which saves the isfinite launches (host time) per weight."""
    if OK_FLOAT:
        v = tl.load(ok_ptr).to(tl.float32)
        return ((v - v) == 0.0).to(tl.int32)  # NaN - NaN and inf - inf are NaN
    else:
        return tl.load(ok_ptr).to(tl.int32)


@triton.jit
def _clip_scalars(norm_ptr, clip, grad_scale, beta1, beta2):
    """A clipping budget on the device: the gradient's scale min(grad_scale, clip / (norm + eps)) (as
    reference.clip_scale) and the folded scalars of triton_backend._lion_scalars, from the norm the
    fused flow measured: no host sync per tensor. A zero scale gives mix = inf (sign(m)), as on the host.
    The two divisions are approximate reciprocals (_rcp: within an ulp; only the sign of c depends on them)."""
    gs = tl.minimum(grad_scale, clip * _rcp(tl.load(norm_ptr).to(tl.float32) + 1e-6))
    return gs, beta1 * _rcp((1.0 - beta1) * gs), (1.0 - beta2) * gs


@triton.jit
def _ef_carry(y, q, hw):
    """Error feedback's int8 carry, (y - q) in units of s/254, stochastically rounded with the weight's
    addend hw (triton_rng._shares): unbiased at any lr (to 1/256 of a carry step for RAND_BITS 8). Rounded
    to nearest, an update below s/508 (lr 1e-5 on a group of absmax 0.65, or any warm-up's first steps) was
    lost every step. |y - q| <= 1/2, so no clamp is needed."""
    return _sr_codes((y - q) * 254.0, SR_UNIT, hw)


@triton.jit
def _round(y, u, ROUNDING: tl.constexpr):
    """y in units of the scale -> codes as float; u: uniforms (used by SR only)."""
    if ROUNDING == 0:
        y = tl.floor(y + u)
    else:  # half away from zero differs from torch's half-to-even only on exact ties
        y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
    return tl.minimum(tl.maximum(y, -127.0), 127.0)  # clamp before the cast: int8 casts wrap


@triton.jit
def _lion_dir(c, lr):
    """-lr * sign(c) (0 for 0 and nan): lr with c's sign bit flipped in, one LOP3, and one select."""
    neg = (c.to(tl.uint32, bitcast=True) & 0x80000000) ^ tlc.to_tensor(-lr).to(tl.uint32, bitcast=True)
    return tl.where(tl.abs(c) > 0, neg.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _lion_w(wc, s, step, r_ptrs, mask, decay, ROUNDING: tl.constexpr):
    """The decayed, stepped weight from its codes wc (fp32) and scale s: one FMA, the scale and the decay
    multiplied per group; error feedback (ROUNDING 2) adds its carry first."""
    if ROUNDING == 2:
        w = wc * s + tl.load(r_ptrs, mask=mask, other=0).to(tl.float32) * (s / 254.0)
        return tl.fma(w, decay, step)
    return tl.fma(wc, s * decay, step)


@triton.jit
def _outlier_step(oi, om, ov_ptrs, m_ptr, ms_ptr, g_ptr, lr, beta1, decay, grad_scale, B: tl.constexpr,
                  M4: tl.constexpr):
    """Exact fp32 Lion step of the outliers at indices oi (mask om; values at ov_ptrs), from the old momentum
    (codes of B-element blocks): lion_kernel_3d's OUTLIERS."""
    mo = _load_m(m_ptr, 0, oi, om, M4) * tl.load(ms_ptr + oi // B, mask=om, other=0.0)
    go = tl.load(g_ptr + oi, mask=om, other=0.0).to(tl.float32) * grad_scale
    co = mo + (1.0 - beta1) * (go - mo)  # torch.lerp's form, as the reference
    uo = tl.where(co > 0, 1.0, tl.where(co < 0, -1.0, 0.0))
    vo = tl.load(ov_ptrs, mask=om, other=0.0)
    tl.store(ov_ptrs, vo * decay - lr * uo, mask=om)


@triton.jit
def _outlier_zero(oi, om, w_ptr, r_ptr, OB: tl.constexpr, ROUNDING: tl.constexpr):
    """An outlier's dense code (and its EF carry) stays 0."""
    tl.store(w_ptr + oi, tl.zeros([OB], dtype=tl.int8), mask=om)
    if ROUNDING == 2:
        tl.store(r_ptr + oi, tl.zeros([OB], dtype=tl.int8), mask=om)


@triton.jit
def _dequant_tile(codes_ptr, scales_ptr, out_ptr, n, pid, G: tl.constexpr, BLOCK: tl.constexpr):
    """out[tile] = codes * scale of their group, for program `pid`'s BLOCK elements."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + offs // G, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (q * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_kernel(codes_ptr, scales_ptr, out_ptr, n, G: tl.constexpr, BLOCK: tl.constexpr):
    _dequant_tile(codes_ptr, scales_ptr, out_ptr, n, tl.program_id(0), G, BLOCK)


@triton.jit
def dequant_hybrid_kernel(codes_ptr, scales_ptr, out_ptr, n, oi_ptr, ov_ptr, optr_ptr, G: tl.constexpr,
                          BLOCK: tl.constexpr, OB: tl.constexpr = 64):
    """dequant_kernel, then this chunk's outliers (sorted indices oi[optr[pid]:optr[pid+1]]) written over
    the dense zeros, after a CTA barrier: the hybrid weight in one launch instead of four torch ops."""
    pid = tl.program_id(0)
    _dequant_tile(codes_ptr, scales_ptr, out_ptr, n, pid, G, BLOCK)
    o_lo = tl.load(optr_ptr + pid)
    o_hi = tl.load(optr_ptr + pid + 1)
    tl.debug_barrier()  # the dense store above wrote 0 at these slots: every thread's store lands first
    ob = tl.arange(0, OB)
    for j in range(o_lo, o_hi, OB):
        om = j + ob < o_hi
        oi = tl.load(oi_ptr + j + ob, mask=om, other=0).to(tl.int64)
        ov = tl.load(ov_ptr + j + ob, mask=om, other=0.0)
        tl.store(out_ptr + oi, ov.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def quant_kernel(x_ptr, codes_ptr, scales_ptr, n, key, offset, B: tl.constexpr, BP2: tl.constexpr,
                 ROUNDING: tl.constexpr):
    """One program per block of B elements: absmax scale, then round (B padded to a power of two)."""
    pid = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BP2)
    offs = pid * B + col
    mask = (col < B) & (offs < n)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.max(tl.abs(x), axis=0) / 127.0
    inv = tl.where(s > 0, 1.0 / s, 0.0)
    q = _round(x * inv, _uniform(key, offs + offset) if ROUNDING == 0 else 0.0, ROUNDING)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scales_ptr + pid, s)


@triton.jit
def lion_kernel(w_ptr, ws_ptr, m_ptr, ms_ptr, g_ptr, r_ptr, ok_ptr, n, lr, beta1, beta2, decay, grad_scale,
                mix, g2, key, offset, clip,
                G: tl.constexpr, GP2: tl.constexpr, RW: tl.constexpr, RWP2: tl.constexpr,
                B: tl.constexpr, RM: tl.constexpr, RMP2: tl.constexpr, ROUNDING: tl.constexpr,
                QUAD_RNG: tl.constexpr, ROUNDS: tl.constexpr = 10, OK_FLOAT: tl.constexpr = False,
                CLIP: tl.constexpr = False, M4: tl.constexpr = False, RAND_BITS: tl.constexpr = 16):
    """One INT8 Lion step over a chunk of RW*G = RM*B elements (a common multiple of both groupings).

    The weight half runs first, in weight-group rows, reading the *old* momentum to get sign(c); the
    momentum half then re-reads its inputs (cache hits) in momentum-block rows and overwrites m. No
    other program touches this chunk, so the order inside the program is the whole synchronisation.
    (A one-pass variant, the [RW, G] tile reshaped to [RM, B] rows, measured slower on the H100 and
    failed a compiled test: not kept.) `ok_ptr` (a device flag, 0 = the gradient is not finite, or a float
    that is not finite: see _load_ok) masks every load and store: a bad tensor is left unwritten without
    a host sync.

    Per element, one FMA each (per-row and host scalars folded, triton_backend._lion_scalars):
    c = m_code * (ms * mix) + g has the sign of b1*m + (1-b1)*gs*g; w = w_code * (s * decay) - lr*sign(c);
    m = m_code * (ms * b2) + g * g2. Masked lanes load 0 and so stay 0: no select before the absmax.
    M4: the momentum is int4, two codes per byte (_load_m, _store_m), drawn from the same bits.
    RAND_BITS: the random bits per element, 16 (the default), 32 or 8 (triton_rng.py: how each element's
    draw feeds its two roundings).
    """
    start = tl.program_id(0).to(tl.int64) * (RW * G)
    n = n * _load_ok(ok_ptr, OK_FLOAT).to(tl.int64)  # not finite: n = 0 masks every load and store
    if CLIP:
        grad_scale, mix, g2 = _clip_scalars(ok_ptr, clip, grad_scale, beta1, beta2)
    # ---- weights: rows are groups of G (padded to GP2 lanes)
    rw = tl.arange(0, RWP2)
    cg = tl.arange(0, GP2)
    offs = start + rw[:, None] * G + cg[None, :]
    mask = (rw[:, None] < RW) & (cg[None, :] < G) & (offs < n)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ms = tl.load(ms_ptr + offs // B, mask=mask, other=0.0)
    c = tl.fma(_load_m(m_ptr, 0, offs, mask, M4), ms * mix, g)
    step = _lion_dir(c, lr)
    grow = start // G + rw
    rmask = (rw < RW) & (grow * G < n)
    s = tl.load(ws_ptr + grow, mask=rmask, other=0.0)
    w = _lion_w(tl.load(w_ptr + offs, mask=mask, other=0).to(tl.float32), s[:, None], step, r_ptr + offs, mask,
                decay, ROUNDING)
    if ROUNDING == 0:  # the weight's share of each element's draw (the momentum half takes the other)
        s_new = tl.maximum(s, tl.max(tl.abs(w), axis=1) * SR_PER_QMAX)
        if QUAD_RNG:
            bits = _bits_rows(key, start + offset, RWP2, G, GP2, ROUNDS, RAND_BITS)
        else:
            bits = _bits(key, offs + offset, ROUNDS, RAND_BITS)
        hw, _ = _shares(bits, RAND_BITS)
        q = _sr_codes(w, _sr_inv(s_new)[:, None], hw)
    else:
        s_new = tl.maximum(s, tl.max(tl.abs(w), axis=1) / 127.0)
        inv = tl.where(s_new > 0, 1.0 / s_new, 0.0)
        y = w * inv[:, None]
        q = _round(y, 0.0, ROUNDING)
    tl.store(w_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(ws_ptr + grow, s_new, mask=rmask)
    if ROUNDING == 2:  # the weight was rounded to nearest: its share of the draws rounds the carry
        if QUAD_RNG:
            bits = _bits_rows(key, start + offset, RWP2, G, GP2, ROUNDS, RAND_BITS)
        else:
            bits = _bits(key, offs + offset, ROUNDS, RAND_BITS)
        hw, _ = _shares(bits, RAND_BITS)
        tl.store(r_ptr + offs, _ef_carry(y, q, hw), mask=mask)
    # ---- momentum: rows are blocks of B
    rm = tl.arange(0, RMP2)
    cb = tl.arange(0, B)
    offs = start + rm[:, None] * B + cb[None, :]
    mask = (rm[:, None] < RM) & (offs < n)
    brow = start // B + rm
    bmask = (rm < RM) & (brow * B < n)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ms = tl.load(ms_ptr + brow, mask=bmask, other=0.0)
    m = tl.fma(_load_m(m_ptr, 0, offs, mask, M4), (ms * beta2)[:, None], g * g2)
    ms_new = _m_scale(tl.max(tl.abs(m), axis=1), M4)
    if QUAD_RNG:  # the same draws again (this layout's rows): the momentum's share
        bits = _bits_rows(key, start + offset, RMP2, B, B, ROUNDS, RAND_BITS)
    else:
        bits = _bits(key, offs + offset, ROUNDS, RAND_BITS)
    # momentum: always stochastic (unbiased EMA)
    _, hm = _shares(bits, RAND_BITS)
    q = _sr_codes(m, _sr_inv(ms_new)[:, None], hm)
    _store_m(m_ptr, 0, offs, q, mask, RMP2 * B, M4)
    tl.store(ms_ptr + brow, ms_new, mask=bmask)


@triton.jit
def _store_rows(ptr, value, mask):
    """tl.store of a per-row vector reduced from a tile (each value held by every thread of its row),
    without the layout conversion Triton puts before such a store (shared memory and a CTA barrier):
    each holder stores the value itself, and a warp's identical stores to one address coalesce. The
    interpreter has no inline asm: tl.store there."""
    if INTERPRETED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
                                  "=r,l,r,r", [ptr.to(tl.int64, bitcast=True), value, mask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def lion_kernel_3d(w_ptr, ws_ptr, m_ptr, ms_ptr, g_ptr, r_ptr, ok_ptr, n, lr, beta1, beta2, decay, grad_scale,
                   mix, g2, key, offset, clip, oi_ptr, ov_ptr, optr_ptr, m_bytes,
                   G: tl.constexpr, K: tl.constexpr, RM: tl.constexpr, ROUNDING: tl.constexpr,
                   ROUNDS: tl.constexpr = 10, OUTLIERS: tl.constexpr = False, OB: tl.constexpr = 64,
                   OK_FLOAT: tl.constexpr = False, CLIP: tl.constexpr = False, M4: tl.constexpr = False,
                   RAND_BITS: tl.constexpr = 16, M4_VEC: tl.constexpr = False,
                   KEEP_OUTLIERS: tl.constexpr = False):
    """lion_kernel when the weight group G (a power of two) divides the momentum block B = K * G.

    One [K, RM, G] tile holds RM momentum blocks of K weight groups each (element (k, r, c) at
    (r * K + k) * G + c), so g, m and w are loaded once and both absmax reductions run on the same
    registers (over G for a weight group, over K and G for a momentum block); no reshape of data. K comes
    first so that Triton's default layout keeps a momentum block inside one warp: its absmax by shuffles,
    not through shared memory and two barriers (an [RM, K, G] tile put K across warps). In-tile offsets
    are int32 (the int64 chunk start is added to the pointers once). The random numbers are those of
    lion_kernel (tests compare the outputs).

    OUTLIERS: the exact fp32 outliers of this chunk (sorted indices oi[optr[pid]:optr[pid+1]]) are updated
    here too, from the old momentum, and their dense codes zeroed after the tile is stored: the whole
    update is one launch instead of a dozen small torch ops.

    M4_VEC (with M4): the tile's packed momentum is loaded and stored as one contiguous byte tile per
    program (a wide access per thread), its nibbles (un)packed in registers; `m_bytes` is the packed
    buffer's length, ceil(n / 2) (unused otherwise). The same bits as M4 alone (tested); without it the
    codes are gathered byte by byte and the store's pairs pass through shared memory.

    KEEP_OUTLIERS (with OUTLIERS): the chunk's first OB outliers (all of them at 1% and chunk <= 6400) are
    updated outside the loop and their indices kept in registers across the barrier for the zeroing, which
    then stores at once instead of waiting on a second load of the indices. The same bits (tested).

    The new momentum is computed before the weight's half, so that g and the old codes die early
    (registers ~90 -> ~62 on sm_90: 8 CTAs of 4 warps per SM instead of 5). The per-group and per-block
    scales are stored by _store_rows: one CTA barrier (the outliers') where Triton's stores put three.
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (RM * K * G)
    ok = _load_ok(ok_ptr, OK_FLOAT)
    n = n * ok.to(tl.int64)  # not finite: n = 0 masks every load and store
    if CLIP:
        grad_scale, mix, g2 = _clip_scalars(ok_ptr, clip, grad_scale, beta1, beta2)
    left = n - start
    rm = tl.arange(0, RM)
    glocal = _tile_groups(RM, K)  # the tile's weight groups, [K, RM]
    local = glocal[:, :, None] * G + tl.arange(0, G)[None, None, :]
    mask = local < left
    gmask = glocal * G < left
    bmask = rm * (K * G) < left
    g = tl.load(g_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
    ms = tl.load(ms_ptr + start // (K * G) + rm, mask=bmask, other=0.0)[None, :, None]
    if M4 and M4_VEC:
        bytes_left = m_bytes * ok - start // 2  # not finite: <= 0, as `left`
        mc = _load_m4_tile(m_ptr, start, bytes_left, RM, K, G)
    else:
        mc = _load_m(m_ptr, start, local, mask, M4)
    step = _lion_dir(tl.fma(mc, ms * mix, g), lr)
    m = tl.fma(mc, ms * beta2, g * g2)  # the new momentum now: g and mc die here (registers)
    ms_new = _m_scale(tl.max(tl.max(tl.abs(m), axis=2), axis=0), M4)
    s = tl.load(ws_ptr + start // G + glocal, mask=gmask, other=0.0)
    w = _lion_w(tl.load(w_ptr + start + local, mask=mask, other=0).to(tl.float32), s[:, :, None], step,
                r_ptr + start + local, mask, decay, ROUNDING)
    if OUTLIERS:  # before any store: they read the old momentum
        o_lo = tl.load(optr_ptr + pid)
        o_hi = o_lo + (tl.load(optr_ptr + pid + 1) - o_lo) * ok  # not finite: no outlier is written
        ob = tl.arange(0, OB)
        o_rest = o_lo
        if KEEP_OUTLIERS:  # the first OB outliers outside the loops, their indices kept for the zeroing
            om0 = o_lo + ob < o_hi
            oi0 = tl.load(oi_ptr + o_lo + ob, mask=om0, other=0).to(tl.int64)
            _outlier_step(oi0, om0, ov_ptr + o_lo + ob, m_ptr, ms_ptr, g_ptr, lr, beta1, decay, grad_scale,
                          K * G, M4)
            o_rest = o_lo + OB
        for j in range(o_rest, o_hi, OB):
            om = j + ob < o_hi
            oi = tl.load(oi_ptr + j + ob, mask=om, other=0).to(tl.int64)
            _outlier_step(oi, om, ov_ptr + j + ob, m_ptr, ms_ptr, g_ptr, lr, beta1, decay, grad_scale, K * G, M4)
    # one draw per element feeds both roundings
    hw, hm = _shares(_bits_3d(key, start + offset, RM, K, G, ROUNDS, RAND_BITS), RAND_BITS)
    if ROUNDING == 0:
        s_new = tl.maximum(s, tl.max(tl.abs(w), axis=2) * SR_PER_QMAX)
        q = _sr_codes4(w, _sr_inv(s_new)[:, :, None], hw)
    else:
        s_new = tl.maximum(s, tl.max(tl.abs(w), axis=2) / 127.0)
        inv = tl.where(s_new > 0, 1.0 / s_new, 0.0)
        y = w * inv[:, :, None]
        q = _round(y, 0.0, ROUNDING)
    tl.store(w_ptr + start + local, q.to(tl.int8), mask=mask)
    _store_rows(ws_ptr + start // G + glocal, s_new, gmask)  # no barrier: see _store_rows
    if ROUNDING == 2:
        tl.store(r_ptr + start + local, _ef_carry(y, q, hw), mask=mask)
    if OUTLIERS:  # an outlier's dense code stays 0 (and its EF carry): after the tile's store, same CTA
        tl.debug_barrier()
        if KEEP_OUTLIERS:
            _outlier_zero(oi0, om0, w_ptr, r_ptr, OB, ROUNDING)
        for j in range(o_rest, o_hi, OB):
            om = j + ob < o_hi
            oi = tl.load(oi_ptr + j + ob, mask=om, other=0).to(tl.int64)
            _outlier_zero(oi, om, w_ptr, r_ptr, OB, ROUNDING)
    # momentum: always stochastic (unbiased EMA)
    inv_m = _sr_inv(ms_new)[None, :, None]
    if M4 and M4_VEC:
        _store_m4_sr_tile(m_ptr, start, bytes_left, _sr_sum(m, inv_m, hm), RM, K, G)
    elif M4:
        _store_m(m_ptr, start, local, _sr_codes(m, inv_m, hm), mask, RM * K * G, M4)
    else:
        _store_m(m_ptr, start, local, _sr_codes4(m, inv_m, hm), mask, RM * K * G, M4)
    _store_rows(ms_ptr + start // (K * G) + rm, ms_new, bmask)
