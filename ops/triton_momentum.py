"""The Lion kernels' momentum storage: int8 codes, or int4 (M4) codes packed two per byte, loaded and stored
per element or (M4_VEC) as whole byte tiles. Twin of reference.pack_int4 / quantize_momentum (tests compare).
"""
import triton
import triton.language as tl

from .triton_rng import INTERPRETED, SR_PER_QMAX, _sum_codes, _tile_groups

# int4 momentum (M4): codes in [-7, 7], two per byte (element 2i in the low nibble, two's complement), as
# reference.pack_int4. The SR scale is absmax / 7 with the same margin as SR_PER_QMAX.
SR_PER_QMAX4 = tl.constexpr((1.0 + 2.0**-20) / 7.0)


@triton.jit
def _m_scale(absmax, M4: tl.constexpr):
    """A momentum block's SR scale from its absmax."""
    if M4:
        return absmax * SR_PER_QMAX4
    return absmax * SR_PER_QMAX


@triton.jit
def _load_m(m_ptr, base, local, mask, M4: tl.constexpr):
    """Momentum codes (fp32) of elements base + local (any shape; masked lanes read 0): int8, or (M4) the
    nibble of byte (base + local) // 2. `base` must be even (a chunk start: a whole number of blocks)."""
    if M4:
        b = tl.load(m_ptr + base // 2 + local // 2, mask=mask, other=0).to(tl.int32)
        nib = (b >> ((local % 2) * 4).to(tl.int32)) & 0xF
        return ((nib ^ 8) - 8).to(tl.float32)
    return tl.load(m_ptr + base + local, mask=mask, other=0).to(tl.float32)


@triton.jit
def _store_m(m_ptr, base, local, q, mask, N: tl.constexpr, M4: tl.constexpr):
    """Store momentum codes q (int8, a tile of N elements whose row-major order pairs 2i, 2i + 1 as
    neighbours in memory, local even at 2i): int8, or (M4) packed two per byte (a masked lane holds code 0,
    so a partial tail's last byte is whole). `base` even, as _load_m. No clamp to [-7, 7]: the SR scale's
    margin (SR_PER_QMAX4) keeps |q| <= 7 for every draw, as SR_PER_QMAX does for int8 (tested at the
    absmax for every rand_bits); the clamp cost 2 of ~50 instructions per element."""
    if M4:
        q = q.to(tl.int32) & 0xF
        lo, hi = tl.split(tl.reshape(q, (N // 2, 2)))
        o, _ = tl.split(tl.reshape(local, (N // 2, 2)))
        mk, _ = tl.split(tl.reshape(mask, (N // 2, 2)))
        tl.store(m_ptr + base // 2 + o // 2, (lo | (hi << 4)).to(tl.uint8), mask=mk)
    else:
        tl.store(m_ptr + base + local, q, mask=mask)


@triton.jit
def _m4_bytes(RM: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """Byte offsets [K, RM, G // 2] of lion_kernel_3d's tile's packed int4 momentum (element (k, r, c) at
    (r * K + k) * G + c), relative to the tile's first byte: contiguous along the last axis, so each
    thread's bytes load and store as one wide access."""
    return _tile_groups(RM, K)[:, :, None] * (G // 2) + tl.arange(0, G // 2)[None, None, :]


@triton.jit
def _load_m4_tile(m_ptr, start, bytes_left, RM: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """_load_m's codes (fp32) for the whole [K, RM, G] tile at element `start` (even): the packed bytes
    loaded as one contiguous tile, both nibbles taken in registers (the low one by shifting it to the
    top and back, arithmetic shifts sign-extending; the high one by the signed byte's shift) and
    interleaved by a join, so element 2i gets byte i's low nibble as in _load_m. `bytes_left`: the packed
    bytes from the tile's first on, a count the JIT sees divisible by 16 (a kernel argument of its own):
    masked by elements (2i < left), the compiler could not prove a thread's bytes all in or all out and
    split the access into single bytes."""
    local = _m4_bytes(RM, K, G)
    byte = tl.load(m_ptr.to(tl.pointer_type(tl.int8)) + start // 2 + local, mask=local < bytes_left, other=0)
    if INTERPRETED:
        byte = byte.to(tl.int32)
        lo = ((byte << 28) >> 28).to(tl.float32)
        hi = (byte >> 4).to(tl.float32)
    else:  # four bytes per register: each nibble, sign bit flipped, is the low byte of the float 2^23 + (n ^ 8)
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 a, b, s, k; mov.b32 k, 0x4B000000; "
            "lop3.b32 a, $8, 0x0F0F0F0F, 0x08080808, 0x6A; shr.u32 s, $8, 4; "
            "lop3.b32 b, s, 0x0F0F0F0F, 0x08080808, 0x6A; "
            "prmt.b32 $0, a, k, 0x7540; prmt.b32 $1, a, k, 0x7541; prmt.b32 $2, a, k, 0x7542; "
            "prmt.b32 $3, a, k, 0x7543; prmt.b32 $4, b, k, 0x7540; prmt.b32 $5, b, k, 0x7541; "
            "prmt.b32 $6, b, k, 0x7542; prmt.b32 $7, b, k, 0x7543; "
            "add.f32 $0, $0, 0fCB000008; add.f32 $1, $1, 0fCB000008; add.f32 $2, $2, 0fCB000008; "
            "add.f32 $3, $3, 0fCB000008; add.f32 $4, $4, 0fCB000008; add.f32 $5, $5, 0fCB000008; "
            "add.f32 $6, $6, 0fCB000008; add.f32 $7, $7, 0fCB000008; }",
            "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    return tl.reshape(tl.join(lo, hi), (K, RM, G))


@triton.jit
def _store_m4_sr_tile(m_ptr, start, bytes_left, u, RM: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """_store_m4_tile of the codes of the SR sums u (triton_rng._sr_sum, _sum_codes), the same bytes: byte 2
    of each sum holds its code's nibble (the 0x80 that _sum_codes adds leaves the low nibble alone),
    so byte permutes gather four pairs' bytes and one shift and one LOP3 pack them, where the shifts and
    masks per element took ~2.5 instructions."""
    if INTERPRETED:
        _store_m4_tile(m_ptr, start, bytes_left, _sum_codes(u), RM, K, G)
    else:
        lo, hi = tl.split(tl.reshape(u, (K, RM, G // 2, 2)))
        byte = tl.inline_asm_elementwise(
            "{ .reg .b32 a, b, l, c, d, h; prmt.b32 a, $1, $2, 0x0062; prmt.b32 b, $3, $4, 0x0062; "
            "prmt.b32 l, a, b, 0x5410; prmt.b32 c, $5, $6, 0x0062; prmt.b32 d, $7, $8, 0x0062; "
            "prmt.b32 h, c, d, 0x5410; shl.b32 h, h, 4; lop3.b32 $0, l, h, 0x0F0F0F0F, 0xE4; }",
            "=r,r,r,r,r,r,r,r,r", [lo, hi], dtype=tl.int8, is_pure=True, pack=4)
        local = _m4_bytes(RM, K, G)
        tl.store(m_ptr.to(tl.pointer_type(tl.int8)) + start // 2 + local, byte, mask=local < bytes_left)


@triton.jit
def _store_m4_tile(m_ptr, start, bytes_left, q, RM: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """_store_m's bytes for the whole [K, RM, G] tile at element `start` (even), without flattening the
    tile: each pair (2i, 2i + 1) split from the tile's last axis in registers, one contiguous byte tile
    stored. A masked lane holds code 0 (as _store_m), so a partial tail's last byte is whole."""
    lo, hi = tl.split(tl.reshape(q.to(tl.int32), (K, RM, G // 2, 2)))
    local = _m4_bytes(RM, K, G)
    tl.store(m_ptr.to(tl.pointer_type(tl.int8)) + start // 2 + local, ((lo & 0xF) | (hi << 4)).to(tl.int8),
             mask=local < bytes_left)
