"""Quantized modules and model conversion."""
from qft_ds.nn.convert import convert_model, is_converted, quantized_weights
from qft_ds.nn.qmodules import QEmbedding, QLinear

__all__ = ["QLinear", "QEmbedding", "convert_model", "is_converted", "quantized_weights"]
