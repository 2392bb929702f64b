"""The Lion kernels' random bits and stochastic rounding (Triton), twinned in torch by reference_rng.py.

Random draws are counter-based Philox (the bits of `tl.randint4x`, see _philox). RAND_BITS (16, 32 or 8)
is the number of random bits each element gets: element e gets piece e % P of philox(key, e // P),
P = 128 / RAND_BITS, the 128 output bits read as P little-endian pieces of RAND_BITS bits (r0's low
piece first). So a rerun is bit-identical and a shard draws what the whole tensor would.

One element's draw feeds both of its roundings (the weight's and the momentum's), each of which adds a
16-bit addend h (_shares) below the code's unit:
- 16 (the default): the weight adds the piece p = (a << 8) | b, the momentum its byte swap (b << 8) | a.
  Each rounding is unbiased to 2^-16 of a step; the weight's up-or-down is decided by a alone except when
  a sits on its threshold (probability 1/256), the momentum's by b alone except when b does, so the two
  are independent but for those two 1/256 cases. One Philox call covers 8 elements.
- 32: the low 16 bits round the weight, the high 16 the momentum (independent); 4 elements per call.
- 8: one byte b for both, the weight adding (b << 8) + 128 and the momentum ((255 - b) << 8) + 128
  (antithetic: each is unbiased only to 1/256 of a step, E[q] = y rounded to a multiple of 1/256, off y
  by up to 1/512 of a step, so a Lion step below s/512 is lost); 16 elements per call. An option for the
  benchmark's sweeps.

With one Philox call per element (`tl.rand`), the 10 Philox rounds made the Lion kernel compute-bound at
a third of copy bandwidth; the kernel is issue-bound (bench/NOTES.md), so the helpers here are written for
the fewest SASS instructions per element (bench/kernel_sass.py counts them).
"""
import os

import triton
import triton.language as tl
from triton.language import core as tlc  # to_tensor: triton 3.6 has it only here

# Read once, as @triton.jit reads it: interpreted kernels run no inline asm (_mulhilo)
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _mulhilo(x, C: tl.constexpr):
    """(hi, lo) 32-bit halves of x * C. Compiled: one mul.wide (IMAD.WIDE.U32); tl.umulhi and a 32-bit
    mul, which the interpreter runs (it has no inline asm), compile mostly to two IMADs."""
    if INTERPRETED:
        return tl.umulhi(x, C), x * C
    return tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }",
                                     "=r,=r,r,r", [x, tl.full(x.shape, C, tl.uint32)],
                                     dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)


@triton.jit
def _philox(key, counter, ROUNDS: tl.constexpr = 10):
    """tl.randint4x(key, counter, ROUNDS), bit for bit (tested), in fewer instructions: each round's two
    products as wide multiplies, and the first round's products of the zero counter words folded."""
    seed = tlc.to_tensor(key).to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    counter = counter.to(tl.int64)  # an int32 counter's >> 32 is undefined once compiled (a no-op for int64)
    ha, c3 = _mulhilo(counter.to(tl.uint32), 0xD2511F53)
    c0 = (counter >> 32).to(tl.uint32) ^ k0  # round 1: c2 = c3 = 0
    c1 = tl.zeros_like(c3)
    c2 = ha ^ k1
    for _ in tl.static_range(ROUNDS - 1):
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        hb, lb = _mulhilo(c2, 0xCD9E8D57)
        ha, la = _mulhilo(c0, 0xD2511F53)
        c0 = hb ^ c1 ^ k0
        c2 = ha ^ c3 ^ k1
        c1 = lb
        c3 = la
    return c0, c1, c2, c3


@triton.jit
def _quad(a0, a1, a2, a3):
    """[..., 2, 2] whose row-major order is a0, a1, a2, a3 (a join puts its arguments on a new last dim)."""
    return tl.join(tl.join(a0, a2), tl.join(a1, a3))


@triton.jit
def _pieces(r0, r1, r2, r3, RAND_BITS: tl.constexpr):
    """The P = 128 / RAND_BITS pieces of one Philox output per counter, on new last dims whose row-major
    order is piece 0, 1, ..., P - 1 (piece i: bits [i * RAND_BITS, (i + 1) * RAND_BITS) of r0 r1 r2 r3).
    Interleaving by joins (even pieces, then odd ones) keeps the pieces of a counter in one thread."""
    if RAND_BITS == 32:
        return _quad(r0, r1, r2, r3)
    elif RAND_BITS == 16:
        return tl.join(_quad(r0 & 0xFFFF, r1 & 0xFFFF, r2 & 0xFFFF, r3 & 0xFFFF),
                       _quad(r0 >> 16, r1 >> 16, r2 >> 16, r3 >> 16))
    else:
        return tl.join(tl.join(_quad(r0 & 0xFF, r1 & 0xFF, r2 & 0xFF, r3 & 0xFF),
                               _quad((r0 >> 16) & 0xFF, (r1 >> 16) & 0xFF, (r2 >> 16) & 0xFF, (r3 >> 16) & 0xFF)),
                       tl.join(_quad((r0 >> 8) & 0xFF, (r1 >> 8) & 0xFF, (r2 >> 8) & 0xFF, (r3 >> 8) & 0xFF),
                               _quad(r0 >> 24, r1 >> 24, r2 >> 24, r3 >> 24)))


@triton.jit
def _bits(key, offs, ROUNDS: tl.constexpr = 10, RAND_BITS: tl.constexpr = 32):
    """RAND_BITS random bits (uint32) for global element offsets of any shape: piece offs % P of
    philox(key, offs // P). One Philox call per element: the slow path, for layouts the tiles below miss."""
    r0, r1, r2, r3 = _philox(key, offs // (128 // RAND_BITS), ROUNDS)
    piece = offs % (128 // RAND_BITS)
    word = piece // (32 // RAND_BITS)
    w = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    if RAND_BITS == 32:
        return w
    return (w >> ((piece % (32 // RAND_BITS)) * RAND_BITS).to(tl.uint32)) & ((1 << RAND_BITS) - 1)


@triton.jit
def _bits_rows(key, base, ROWS: tl.constexpr, STRIDE: tl.constexpr, COLS: tl.constexpr,
               ROUNDS: tl.constexpr = 10, RAND_BITS: tl.constexpr = 32):
    """The same bits as _bits for the tile [ROWS, COLS] at base + r * STRIDE + c, one Philox call per P
    elements. Needs base, STRIDE and COLS divisible by P = 128 / RAND_BITS (the caller checks)."""
    r = tl.arange(0, ROWS)
    k = tl.arange(0, COLS * RAND_BITS // 128)
    counters = (base + r[:, None] * STRIDE) // (128 // RAND_BITS) + k[None, :]
    r0, r1, r2, r3 = _philox(key, counters, ROUNDS)
    return tl.reshape(_pieces(r0, r1, r2, r3, RAND_BITS), (ROWS, COLS))


@triton.jit
def _tile_groups(R: tl.constexpr, K: tl.constexpr):
    """[K, R]: the weight-group index r * K + k of each row of lion_kernel_3d's [K, R, G] tile (K first, so
    that Triton's default layout keeps a momentum block of K groups in one warp). The kernel's offsets, its
    random bits and its packed int4 bytes all index the tile through this."""
    return tl.arange(0, R)[None, :] * K + tl.arange(0, K)[:, None]


@triton.jit
def _bits_3d(key, base, R: tl.constexpr, K: tl.constexpr, G: tl.constexpr, ROUNDS: tl.constexpr = 10,
             RAND_BITS: tl.constexpr = 32):
    """_bits_rows for lion_kernel_3d's [K, R, G] tile, element (k, r, c) at base + (r * K + k) * G + c: the
    same bits, one Philox call per P elements. Needs base and G divisible by P = 128 / RAND_BITS."""
    j = tl.arange(0, G * RAND_BITS // 128)
    counters = (base + _tile_groups(R, K)[:, :, None] * G) // (128 // RAND_BITS) + j[None, None, :]
    r0, r1, r2, r3 = _philox(key, counters, ROUNDS)
    return tl.reshape(_pieces(r0, r1, r2, r3, RAND_BITS), (K, R, G))


@triton.jit
def _uniform(key, offs, ROUNDS: tl.constexpr = 10):
    """U[0,1) (32-bit) for global element offsets of any shape."""
    return tl.uint_to_uniform_float(_bits(key, offs, ROUNDS, 32))


@triton.jit
def _byteswap16(p):
    """(b << 8) | a for p = (a << 8) | b: one PRMT compiled (the interpreter has no inline asm)."""
    if INTERPRETED:
        return ((p & 0xFF) << 8) | (p >> 8)
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0x4401;", "=r,r", [p], dtype=tl.uint32, is_pure=True,
                                     pack=1)


@triton.jit
def _shares(bits, RAND_BITS: tl.constexpr = 16):
    """(the weight's h, the momentum's h): the 16-bit addends of an element's two roundings, from its draw
    (the module docstring says how each RAND_BITS splits it)."""
    bits = bits.to(tl.uint32)
    if RAND_BITS == 32:
        return bits & 0xFFFF, bits >> 16
    if RAND_BITS == 16:
        return bits, _byteswap16(bits)
    return (bits << 8) | 0x80, ((bits ^ 0xFF) << 8) | 0x80  # + 1/2 of the byte's unit: round to nearest


# Stochastic rounding in integers. x = w * (2^15 / s) + 1.5 * 2^23 (one FMA) lands on the integer grid
# (ulp 1 for |w * 2^15 / s| < 2^22), so the float's bits are 0x4B400000 + Y, Y = round_nearest(y * 2^15)
# with y = w / s. Doubling them and adding a 16-bit random h, the code is byte 2: q = (2Y + h) >> 16 rounds
# up with probability (2Y mod 2^16) / 2^16, so E[q] = Y / 2^15 exactly, within 2^-16 of y either way.
# No conversion, no float floor: the kernel is issue-bound. The SR scale is absmax / 127 times
# (1 + 2^-20): with the division's and the products' rounding, |Y| stays below 127 * 2^15 - 1, so q
# needs no clamp.
SR_PER_QMAX = tl.constexpr((1.0 + 2.0**-20) / 127.0)
SR_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23, bits 0x4B400000
SR_UNMAGIC2 = tl.constexpr(0x69800000)  # -2 * 0x4B400000 mod 2^32: removes the doubled magic
SR_UNIT = tl.constexpr(32768.0)  # 2^15: one code is 2^15 on the FMA's integer grid


@triton.jit
def _rcp(x):
    """1 / x, approximate (rcp.approx: within 1 ulp, one MUFU where the rounded division's range checks take
    ~8 instructions per program and value); the interpreter divides."""
    if INTERPRETED:
        return 1.0 / x
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _sr_inv(s):
    """2^15 / s; 0 for s = 0, and for s < 1e-30, where it would overflow (such a block rounds to 0). _rcp's
    ulp is far inside the SR scale's margin (SR_PER_QMAX)."""
    return tl.where(s > 1e-30, SR_UNIT * _rcp(s), 0.0)


@triton.jit
def _sr_sum(x, inv, h):
    """2t + h (uint32: its wrap-around is the point), whose byte 2 plus 0x80 is the code (the comment above)."""
    t = tl.fma(x, inv, SR_MAGIC).to(tl.uint32, bitcast=True)
    return t + t + h


@triton.jit
def _sum_codes(u):
    """int8 codes of SR sums u (_sr_sum): byte 2, less the doubled magic."""
    return ((u + SR_UNMAGIC2) >> 16).to(tl.int8)


@triton.jit
def _sr_codes(x, inv, h):
    """int8 codes of x * inv / 2^15 (inv from _sr_inv), stochastically rounded with the 16-bit addend h
    (from _shares), as the comment above says."""
    return _sum_codes(_sr_sum(x, inv, h))


@triton.jit
def _sr_codes4(x, inv, h):
    """_sr_codes, bit for bit, with the codes packed four to a register by byte permutes (the code is byte 2
    of 2t + h, flipped by 0x80 for the doubled magic): 3 PRMT and an XOR per four codes where the shift and
    Triton's packing take 8. Needs a multiple of 4 contiguous elements per thread; the interpreter runs
    _sr_codes."""
    if INTERPRETED:
        return _sr_codes(x, inv, h)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a, b, c; prmt.b32 a, $1, $2, 0x0062; prmt.b32 b, $3, $4, 0x0062; "
        "prmt.b32 c, a, b, 0x5410; xor.b32 $0, c, 0x80808080; }",
        "=r,r,r,r,r", [_sr_sum(x, inv, h)], dtype=tl.int8, is_pure=True, pack=4)
