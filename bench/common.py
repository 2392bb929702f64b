"""Shared benchmark plumbing: environment record, result files, single-process distributed env, aten op
counts, and modules loaded from an older commit's source."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit(given: str | None = None) -> str:
    """The GPU machine's copy has no git history: the caller passes the commit in."""
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host_cpu() -> dict:
    """The host's CPU model, cores and load: host-bound steps vary with them between machines of one kind."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": os.cpu_count(), "usable_cores": usable, "load_1min": load and round(load[0], 2)}


def header(commit: str | None) -> dict:
    return {"device": device_name(), "host_cpu": host_cpu(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": git_commit(commit), "torch": torch.__version__}


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M')
    path = out_dir / f"{name}_{stamp}.json"
    n = 1
    while path.exists():  # two runs in one minute (one command's runs) keep both
        n += 1
        path = out_dir / f"{name}_{stamp}-{n}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return path


def write_partial(name: str, payload: dict, out_dir: Path | None = None) -> None:
    """Rewritten after every run, so what finished survives a timeout."""
    path = Path(out_dir or RESULTS) / f"{name}_partial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def single_process_env(port: int | None = None) -> None:
    """A one-rank distributed env; MASTER_PORT, unless set, is a free port, so that several benchmark
    processes can share the machine (a fixed port made the second one fail with EADDRINUSE)."""
    if port is None and "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


class OpNames(TorchDispatchMode):
    """The aten ops run inside the `with` block, by name in order (`ops`): what a code path launches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def module_from_source(source: str, name: str):
    """A module made from its source text (e.g. an older commit's file, compared in the same process)."""
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
