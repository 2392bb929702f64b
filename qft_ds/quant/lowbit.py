"""Low-bit (3/4-bit) asymmetric weights for PEQA and QST: RTN codes with integer zero points.

    w ~= s * (q - z),   q in [0, 2^b - 1],   z an integer in the same range

One (s, z) per output row and group of G input columns; G = 0 means one per row (per output channel).
A row's last group may be partial (576 columns = 4 x 128 + 64): groups never straddle rows, and G is
honoured exactly rather than rounded to a divisor of the row length.

Each group's range is widened to include 0 (as GPTQ does), so z lands in [0, 2^b - 1] exactly and a
zero weight stays exactly zero.

Storage: codes are packed two per byte (nibbles) for 3 and 4 bits alike, so 3 bits cost the same 0.5
byte per weight as 4 bits. True 3-bit packing (8 codes in 3 bytes) would save 1/16 byte per weight
and make every unpack straddle bytes; not worth it at this size. Zero points take one uint8 per group
and scales one fp32 per group: 0.5 + 5/G bytes per weight (0.539 at G = 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = (3, 4)


def effective_group(cols: int, group_size: int) -> int:
    """G = 0 (per channel) or G >= cols: one group per row."""
    return cols if group_size == 0 or group_size >= cols else group_size


def n_groups(cols: int, group: int) -> int:
    return -(-cols // group)


def _grouped(w: torch.Tensor, group: int, fill: float = 0.0) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, group], padding the last partial group with `fill`."""
    rows, cols = w.shape
    pad = n_groups(cols, group) * group - cols
    if pad:
        w = F.pad(w, (0, pad), value=fill)
    return w.view(rows, -1, group)


def quantize_asym(w: torch.Tensor, bits: int, group: int):
    """RTN: fp [rows, cols] -> (codes uint8 [rows, cols], scales fp32 [rows, ng], zeros uint8 [rows, ng])."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    qmax = (1 << bits) - 1
    w = w.detach().float()
    lo = _grouped(w, group, float("inf")).amin(dim=2).clamp(max=0.0)
    hi = _grouped(w, group, float("-inf")).amax(dim=2).clamp(min=0.0)
    scales = (hi - lo) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: q = z = 0
    zeros = torch.round(-lo / scales).clamp_(0, qmax)
    q = torch.round(_grouped(w, group) / scales[..., None]) + zeros[..., None]
    codes = q.clamp_(0, qmax).view(w.shape[0], -1)[:, : w.shape[1]].to(torch.uint8)
    return codes.contiguous(), scales, zeros.to(torch.uint8)


def dequantize_asym(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes [rows, cols], scales, zeros) -> s * (q - z) as [rows, cols] in `dtype`."""
    rows, cols = codes.shape
    centred = _grouped(codes.float(), group) - zeros.float()[..., None]
    return (centred * scales.float()[..., None]).view(rows, -1)[:, :cols].to(dtype)


def scale_grad(grad_w: torch.Tensor, codes: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """d loss / d s for w = s * (q - z): per group, sum of grad_w * (q - z)."""
    centred = _grouped(codes.float(), group) - zeros.float()[..., None]
    return (_grouped(grad_w.float(), group) * centred).sum(dim=2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] -> uint8 [ceil(n / 2)]: element 2i in the low nibble, 2i + 1 in the high one."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)
    return out[:numel]


class LowBitWeight(nn.Module):
    """A frozen low-bit weight: packed codes + zero points, and a scale that may be trainable (PEQA).

    `layout` (int32 [rows, cols, bits, group]) travels in the state dict, so a checkpoint or export
    describes itself: the dense export needs no model rebuild.
    """

    def __init__(self, weight: torch.Tensor | None, bits: int = 4, group_size: int = 128,
                 trainable_scale: bool = False, shape: tuple | None = None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: per output channel), got {group_size}")
        self.shape = tuple(weight.shape) if weight is not None else tuple(shape)
        rows, cols = self.shape
        self.bits, self.group = bits, effective_group(cols, group_size)
        if weight is not None:
            codes, scales, zeros = quantize_asym(weight, bits, self.group)
        else:  # filled by load_state_dict / copy_ (loaders): no quantization work
            codes = torch.zeros(rows, cols, dtype=torch.uint8)
            scales = torch.ones(rows, n_groups(cols, self.group))
            zeros = torch.zeros_like(scales, dtype=torch.uint8)
        self.register_buffer("packed", pack_nibbles(codes))
        self.register_buffer("zeros", zeros)
        self.register_buffer("layout", torch.tensor([rows, cols, bits, self.group], dtype=torch.int32))
        if trainable_scale:
            self.scale = nn.Parameter(scales)
        else:
            self.register_buffer("scale", scales)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.packed, self.numel).view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, codes: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.codes() if codes is None else codes
        return dequantize_asym(codes, self.scale.detach(), self.zeros, self.group, dtype)

    def scale_grad(self, grad_w: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        return scale_grad(grad_w, self.codes() if codes is None else codes, self.zeros, self.group)

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.zeros, self.scale))

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, bits={self.bits}, group={self.group}, "
                f"trainable_scale={isinstance(self.scale, nn.Parameter)}")
