"""qft_ds: Quantized Full-parameter Tuning (int8 weights, int8 Lion momentum) as a DeepSpeed plugin.

`import qft_ds` (before or after `import deepspeed`) registers `torch.optim.QFTLion` and routes
`deepspeed.initialize` calls whose config selects QFT (a "qft" section or optimizer type "QFTLion") to
`qft_ds.initialize`, as soon as DeepSpeed is imported (qft_ds.import_hooks); qft_ds itself imports torch
and DeepSpeed only when first used, so its command line starts quickly.
"""
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

if _ilu.find_spec("qft_ds.ops") is None:  # a source checkout on PYTHONPATH: map the top-level ops/ folder
    _ops = _Path(__file__).resolve().parent.parent / "ops" / "__init__.py"
    _spec = _ilu.spec_from_file_location("qft_ds.ops", _ops, submodule_search_locations=[str(_ops.parent)])
    _spec.loader = _ilu.LazyLoader(_spec.loader)  # runs on first use: ops/ imports torch
    _sys.modules["qft_ds.ops"] = _mod = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    ops = _mod

from qft_ds import import_hooks as _import_hooks  # noqa: E402
from qft_ds.version import __version__  # noqa: E402

# name -> module: imported on first use (PEP 562), so `import qft_ds` does not load torch or DeepSpeed
_LAZY = {"initialize": "qft_ds.engine", "install_deepspeed_hook": "qft_ds.engine", "QFTConfig": "qft_ds.config",
         "QFTLion": "qft_ds.optim", "QTensor": "qft_ds.quant", "HybridWeight": "qft_ds.quant",
         "QLinear": "qft_ds.nn", "QEmbedding": "qft_ds.nn", "convert_model": "qft_ds.nn",
         "quantized_weights": "qft_ds.nn"}

__all__ = ["initialize", "QFTConfig", "QFTLion", "QTensor", "HybridWeight", "QLinear", "QEmbedding",
           "convert_model", "quantized_weights"]


def __getattr__(name):
    import importlib
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif _ilu.find_spec(f"{__name__}.{name}") is not None:  # a submodule: qft_ds.config.load_ds_config(...)
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'qft_ds' has no attribute {name!r}")
    globals()[name] = value
    return value


def _deepspeed_imported():
    if "qft_ds.engine" not in _sys.modules:  # one being imported installs itself as it ends
        import qft_ds.engine  # noqa: F401  (registers QFTLion, wraps deepspeed.initialize and the shm build)


_import_hooks.quiet_repeated_cpu_fallback()  # before DeepSpeed's import, where it would print
_import_hooks.after_import("deepspeed", _deepspeed_imported)
