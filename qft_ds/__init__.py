"""qft_ds: Quantized Full-parameter Tuning (int8 weights, int8 Lion momentum) as a DeepSpeed plugin.

`import qft_ds` registers `torch.optim.QFTLion` and routes `deepspeed.initialize` calls whose config
selects QFT (a "qft" section or optimizer type "QFTLion") to `qft_ds.initialize`.
"""
from qft_ds.config import QFTConfig
from qft_ds.engine import initialize, install_deepspeed_hook
from qft_ds.nn import QEmbedding, QLinear, convert_model, quantized_weights
from qft_ds.optim import QFTLion
from qft_ds.quant import HybridWeight, QTensor

__version__ = "0.1.0"
__all__ = ["initialize", "QFTConfig", "QFTLion", "QTensor", "HybridWeight", "QLinear", "QEmbedding",
           "convert_model", "quantized_weights"]

install_deepspeed_hook()
