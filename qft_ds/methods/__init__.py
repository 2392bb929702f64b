"""The other training methods selected by `"qft": {"method": ...}`: PEQA (scales-only) and QST (side network).

Both share the low-bit weight representation (qft_ds.quant.lowbit) and train with a standard torch
optimizer through DeepSpeed (qft_ds.methods.setup); QFT itself lives in qft_ds.optim and qft_ds.nn.
"""
from qft_ds.methods.peqa import convert_peqa, load_peqa
from qft_ds.methods.qst import QSTModel, build_qst
from qft_ds.methods.qst_export import load_qst

__all__ = ["convert_peqa", "load_peqa", "QSTModel", "build_qst", "load_qst"]
