"""The integer state representation: QTensor (int8 codes + block scales) and the hybrid weight."""
from qft_ds.quant.hybrid import HybridWeight, choose_group
from qft_ds.quant.qtensor import QTensor

__all__ = ["QTensor", "HybridWeight", "choose_group"]
