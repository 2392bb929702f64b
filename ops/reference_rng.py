"""The Triton Lion kernels' random stream and integer stochastic rounding, in torch (triton_rng.py's twin).

reference.lion_step(..., rand_bits=16 | 32 | 8) rounds with these, so the reference draws the kernels'
bits: kernel and reference then agree up to rare flips where their float arithmetic rounds differently
(an FMA against two roundings), instead of only in distribution. Without `rand_bits` the reference keeps
its own generator (reference.uniform). uint32 values are held in int64 tensors.
"""
from __future__ import annotations

import torch

RAND_BITS_CHOICES = (16, 32, 8)
DEFAULT_RAND_BITS = 16  # the kernels' default (triton_rng's module docstring)
_M32 = 0xFFFFFFFF
# Philox4x32's constants (Random123; triton.language.random)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def check_rand_bits(rand_bits) -> int:
    if rand_bits not in RAND_BITS_CHOICES:
        raise ValueError(f"rand_bits must be one of {RAND_BITS_CHOICES}, got {rand_bits!r}")
    return rand_bits


def _mulhilo(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of x * c for uint32 x (int64 tensor), without int64 overflow: c in 16-bit
    halves, floor((x * c_hi * 2^16 + x * c_lo) / 2^32) = (x * c_hi + (x * c_lo >> 16)) >> 16."""
    p1, p0 = x * (c >> 16), x * (c & 0xFFFF)
    return (p1 + (p0 >> 16)) >> 16, (x * c) & _M32  # the low word of a wrapped int64 product is exact


def philox4x32(key: int, counters: torch.Tensor, rounds: int = 10):
    """tl.randint4x(key, counters, rounds): four uint32 words (int64 tensors) per counter (int64)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hb, lb = _mulhilo(c2, _ROUND_B)
        ha, la = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hb ^ c1 ^ k0, lb, ha ^ c3 ^ k1, la
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def draws(key: int, offset: int, n: int, rand_bits: int, device, rounds: int = 10) -> torch.Tensor:
    """The kernels' draws (int64 holding `rand_bits` bits) for global elements [offset, offset + n):
    element e gets piece e % P of philox(key, e // P), P = 128 / rand_bits, the four words read as P
    little-endian pieces (triton_rng's module docstring)."""
    pieces = 128 // check_rand_bits(rand_bits)
    e = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    first = offset // pieces
    words = torch.stack(philox4x32(key, torch.arange(first, (offset + n - 1) // pieces + 1, dtype=torch.int64,
                                                      device=device), rounds), dim=1)  # [counters, 4]
    piece = e % pieces
    per_word = pieces // 4
    w = words[e // pieces - first, piece // per_word]
    return (w >> ((piece % per_word) * rand_bits)) & ((1 << rand_bits) - 1)


def shares(d: torch.Tensor, rand_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight's addend, the momentum's addend), each 16 bits: how one element's draw feeds its two
    roundings (triton_rng's module docstring). 16: the piece and its byte swap; 32: the low and high
    halves; 8: the byte b as (b << 8) + 128 and, antithetic, ((255 - b) << 8) + 128."""
    if rand_bits == 32:
        return d & 0xFFFF, d >> 16
    if rand_bits == 16:
        return d, ((d & 0xFF) << 8) | (d >> 8)
    return (d << 8) + 128, ((255 - d) << 8) + 128


SR_MARGIN = 1.0 + 2.0**-20  # the kernels' SR scale: absmax / qmax times this, so |codes| <= qmax unclamped
SR_SHIFT = 15  # the FMA lands y * 2^15 on the integer grid; doubled, the 16-bit addend rounds it


def sr_scales(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """The kernels' SR scale, absmax * fp32((1 + 2^-20) / qmax): the product of the same fp32 numbers."""
    return absmax.float() * torch.tensor(SR_MARGIN / qmax, dtype=torch.float32)


def sr_inverse(scales: torch.Tensor) -> torch.Tensor:
    """fp32 2^15 / scale, 0 where scale <= 1e-30 (as triton_rng._sr_inv)."""
    return torch.where(scales > 1e-30, (2.0**SR_SHIFT) / scales, torch.zeros_like(scales))


def sr_codes(x: torch.Tensor, inv: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """int8 codes floor((2Y + h) / 2^16), Y = x * inv rounded half to even, h a 16-bit addend (shares):
    E[q] = Y / 2^15, within 2^-16 of x * inv / 2^15. The product of two fp32 numbers is exact in fp64, so
    Y is what the kernels' fma(x, inv, 1.5 * 2^23) leaves in the float's bits."""
    y = torch.round(x.double() * inv.double()).long()
    return torch.div(2 * y + h, 2**(SR_SHIFT + 1), rounding_mode="floor").to(torch.int8)
