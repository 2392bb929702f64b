"""A process started without a launcher (`python script.py`) sets itself up as rank 0 of 1.

DeepSpeed's distributed init needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them
it falls back to MPI discovery and fails (`ModuleNotFoundError: mpi4py`) in every plain-python path: a
user's script, HF Trainer, TRL, an in-process accelerate loop. `qft_ds.initialize` (and so the wrapped
`deepspeed.initialize`) and train.py call `prepare_process()` before DeepSpeed's init:

- `lone_process_env()`: when neither RANK nor WORLD_SIZE is set, set the five variables (a free
  MASTER_PORT, never a fixed one: two jobs on one machine would collide); values already set are kept;
- `skip_cpu_shm_build()` (also run at `import qft_ds`): on the CPU, DeepSpeed JIT-builds its shared-memory
  allreduce op (`deepspeed_shm_comm`) in every process that starts its distributed layer: minutes on a first
  launch. One process needs no allreduce, so the build is skipped; with several, one line says it is building.
"""
from __future__ import annotations

import os
import socket
import sys

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def lone_process_env() -> bool:
    """Rank 0 of 1 when no launcher set RANK or WORLD_SIZE; returns whether it set anything."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return False
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port(os.environ["MASTER_ADDR"]))
    return True


def _on_cpu() -> bool:
    import torch
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"] == "cpu"
    return not torch.cuda.is_available()


def _shm_module():
    try:
        import deepspeed.comm.torch  # noqa: F401
    except ImportError:
        return None
    # through sys.modules: `import deepspeed.comm.torch as m` binds the torch package (deepspeed.comm.torch)
    return sys.modules.get("deepspeed.comm.torch")


def _shm_op_cached() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
        name = ShareMemCommBuilder.NAME
        return os.path.isfile(os.path.join(_get_build_directory(name, False), f"{name}.so"))
    except Exception:  # noqa: BLE001  (a layout we do not know: say it may build)
        return False


def skip_cpu_shm_build() -> None:
    """Wrap DeepSpeed's shm op build, deciding when it runs: on the CPU one process skips it, several print one
    line first (when it is not cached yet). Installed at `import qft_ds`, so it also covers launchers
    (`accelerate launch`) whose processes start DeepSpeed's distributed layer before `deepspeed.initialize`."""
    mod = _shm_module()
    real = getattr(mod, "build_shm_op", None)
    if real is None or getattr(real, "_qft_wrapped", False):
        return

    def build_shm_op():
        if not _on_cpu():
            return real()
        if os.environ.get("WORLD_SIZE", "1") == "1":
            return None  # one process: nothing to all-reduce across
        if os.environ.get("LOCAL_RANK", "0") == "0" and not _shm_op_cached():
            print("qft_ds: DeepSpeed is building its deepspeed_shm_comm op for CPU allreduce (a JIT build: "
                  "minutes on a first launch, cached after in TORCH_EXTENSIONS_DIR)", file=sys.stderr, flush=True)
        return real()

    build_shm_op._qft_wrapped = True
    mod.build_shm_op = build_shm_op


def prepare_process() -> None:
    """Call before DeepSpeed's distributed init: lone-process variables, then the CPU shm op choice."""
    from qft_ds import comm
    if comm.is_initialized():
        return  # the caller (a launcher, Trainer, accelerate) has set up the processes already
    lone_process_env()
    skip_cpu_shm_build()
