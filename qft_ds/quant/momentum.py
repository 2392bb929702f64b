"""QFTLion's quantized momentum state: int8 (the default) or int4 blockwise codes, one fp32 scale per block.

    "m_codes":  int8 [n] (bits 8), or uint8 [ceil(n / 2)] holding two int4 codes per byte (bits 4)
    "m_scales": fp32 [ceil(n / block)], absmax / 127 or absmax / 7

`n` is the slice of the weight this rank owns (the whole weight unsharded). Both formats are updated by
ops.lion_step (momentum_bits), stochastically rounded under the same counter-based keys. The block layout
is the int8 one: ZeRO cuts shards at multiples of the block (zero/partition.py), and the block is even
for int4, so a shard starts on a whole byte and 1 rank and N ranks hold the same bytes. Checkpoints read
element ranges of the codes as ranges of `elements_per_code`-element units (zero/checkpoint.Pieces.read).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qft_ds.ops import reference as ref


@dataclass(frozen=True)
class MomentumFormat:
    bits: int
    block: int

    def __post_init__(self):
        ref.check_momentum_bits(self.bits)
        if self.bits == 4 and self.block % 2:
            raise ValueError(f"momentum_bits 4 packs two codes per byte within a block: block_size must be even, "
                             f"got {self.block}")

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def elements_per_code(self) -> int:
        """Momentum elements per stored code entry (one byte)."""
        return 8 // self.bits

    def codes_len(self, n: int) -> int:
        return -(-n // self.elements_per_code)

    def zeros(self, n: int, device) -> dict:
        """A zero momentum for n elements (an all-zero buffer decodes to 0 in both formats)."""
        return {"m_codes": torch.zeros(self.codes_len(n), dtype=self.dtype, device=device),
                "m_scales": torch.zeros(ref.num_blocks(n, self.block), dtype=torch.float32, device=device)}

    def dequantize(self, state: dict, n: int) -> torch.Tensor:
        """The fp32 momentum [n] of a state made by zeros() and updated by ops.lion_step."""
        return ref.dequantize_momentum(state["m_codes"], state["m_scales"], self.block, n, self.bits)


def saved_momentum_bits(qft_state: dict | None) -> int:
    """The momentum width a checkpoint's optimizer state was saved with (8 before the key existed)."""
    return int((qft_state or {}).get("momentum_bits", 8))


def check_resume_bits(qft_state: dict | None, bits: int) -> None:
    """Refuse to resume momentum of another width: the codes would be read as the wrong format."""
    saved = saved_momentum_bits(qft_state)
    if saved != bits:
        raise ValueError(f"the checkpoint's momentum is int{saved} ('qft.momentum_bits' {saved}), this run's "
                         f"is int{bits} ('qft.momentum_bits' {bits}): resume with \"momentum_bits\": {saved}")


def check_checkpoint_momentum(meta: dict, optimizer) -> None:
    """Before a load writes anything: a QFTLion resumes only momentum of its own width (other optimizers,
    PEQA's and QST's, keep no quantized momentum)."""
    fmt = getattr(optimizer, "momentum", None)
    if isinstance(fmt, MomentumFormat):
        check_resume_bits((meta.get("optimizer") or {}).get("qft"), fmt.bits)
