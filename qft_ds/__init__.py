"""qft_ds: Quantized Full-parameter Tuning (int8 weights, int8 Lion momentum) as a DeepSpeed plugin.

`import qft_ds` registers `torch.optim.QFTLion` and routes `deepspeed.initialize` calls whose config
selects QFT (a "qft" section or optimizer type "QFTLion") to `qft_ds.initialize`.
"""
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

if _ilu.find_spec("qft_ds.ops") is None:  # a source checkout on PYTHONPATH: map the top-level ops/ folder
    _ops = _Path(__file__).resolve().parent.parent / "ops" / "__init__.py"
    _spec = _ilu.spec_from_file_location("qft_ds.ops", _ops, submodule_search_locations=[str(_ops.parent)])
    _sys.modules["qft_ds.ops"] = _mod = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    ops = _mod

from qft_ds.config import QFTConfig  # noqa: E402
from qft_ds import launch_env as _launch_env  # noqa: E402
from qft_ds.engine import initialize, install_deepspeed_hook  # noqa: E402
from qft_ds.nn import QEmbedding, QLinear, convert_model, quantized_weights  # noqa: E402
from qft_ds.optim import QFTLion  # noqa: E402
from qft_ds.quant import HybridWeight, QTensor  # noqa: E402
from qft_ds.version import __version__  # noqa: E402

__all__ = ["initialize", "QFTConfig", "QFTLion", "QTensor", "HybridWeight", "QLinear", "QEmbedding",
           "convert_model", "quantized_weights"]

install_deepspeed_hook()
_launch_env.skip_cpu_shm_build()  # decides when DeepSpeed would build it: see launch_env
