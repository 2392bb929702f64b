"""What `import qft_ds` arranges without importing torch or DeepSpeed itself, so that `qft_ds --help` and
`qft_ds plot` start in a fraction of a second (the eager imports took 4-7 s on a 2-core machine).

- `after_import(name, callback)`: run `callback()` as soon as module `name` has been imported (now, if it
  already is). qft_ds uses it for DeepSpeed: once it is imported, qft_ds.engine is imported too, which
  registers `torch.optim.QFTLion` and wraps `deepspeed.initialize` (and the CPU shm-op build), so
  `import qft_ds` before or after `import deepspeed` works as it always did. qft_ds.engine imports nothing
  beyond torch, DeepSpeed, safetensors and qft_ds itself, so running it inside DeepSpeed's import cannot
  meet a half-imported third package.
- `quiet_repeated_cpu_fallback()`: under DeepSpeed's launcher, its runner and launch processes have each
  printed "Setting accelerator to CPU ..." already; the training process would print it a third time.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it asks the other finders, and makes the module's loader call back after it ran.
    It stays in place until the module is imported: `importlib.util.find_spec(name)` alone (transformers'
    is_deepspeed_available) must not use it up."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self._finding = name, callback, False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders' answer
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                self.callback()

        spec.loader.exec_module = exec_then_callback
        return spec


def after_import(name: str, callback) -> None:
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


class _RepeatedCpuFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # CROSS_SIZE is set by DeepSpeed's launcher (deepspeed.launcher.launch) only
        return not ("CROSS_SIZE" in os.environ and record.getMessage().startswith("Setting accelerator to CPU"))


def quiet_repeated_cpu_fallback() -> None:
    """A filter on DeepSpeed's logger (the same object DeepSpeed configures when it is imported later)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _RepeatedCpuFallback) for f in logger.filters):
        logger.addFilter(_RepeatedCpuFallback())
