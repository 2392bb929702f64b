"""Optimizers over the int8 state: one Lion core (lion.py), told where its state lives by a sharding strategy."""
from qft_ds.optim.lion import QFTLion
from qft_ds.optim.sharding import NoSharding

__all__ = ["QFTLion", "NoSharding"]
