"""Optimizers over the int8 state."""
from qft_ds.optim.lion import QFTLion

__all__ = ["QFTLion"]
