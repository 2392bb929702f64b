"""A spy on torch.distributed's collectives, for the tests of qft_ds's one communication layer.

Every collective that qft_ds's own code (qft_ds/, train.py, bench/) starts must come from qft_ds/comm.py,
and every tensor it hands over must be on the device the process group serves. The spy records the
calls that break either rule, per scenario, and lets every call through (so ranks stay in step).
Collectives that DeepSpeed's engine or the tests themselves start are not qft_ds's and are ignored.
"""
import collections
import functools
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

ROOT = Path(__file__).resolve().parents[1]
COMM_FILE = ROOT / "qft_ds" / "comm.py"
OWN = (ROOT / "qft_ds", ROOT / "train.py", ROOT / "bench")
NAMES = ("all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "broadcast_object_list", "all_gather",
         "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_gather_coalesced",
         "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
         "_reduce_scatter_base", "barrier", "monitored_barrier", "gather", "gather_object", "scatter",
         "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
         "batch_isend_irecv")


def _passthrough_dirs() -> list[Path]:
    """torch's and deepspeed.comm's frames only pass a call on (wrappers, deprecated names)."""
    dirs = [Path(torch.__file__).resolve().parent]
    ds = sys.modules.get("deepspeed")
    if ds is not None:
        dirs.append(Path(ds.__file__).resolve().parent / "comm")
    return dirs


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@functools.lru_cache(maxsize=None)
def _resolve(filename: str) -> Path:
    return Path(filename).resolve()


def caller(frame):
    """(file, line) of qft_ds's code that started the collective running in `frame`, or None when the
    first frame outside torch and deepspeed.comm is not qft_ds's (DeepSpeed's engine, a test)."""
    passthrough = _passthrough_dirs()
    while frame is not None:
        path = _resolve(frame.f_code.co_filename)
        if not any(_under(path, d) for d in passthrough):
            return (path, frame.f_lineno) if any(_under(path, o) for o in OWN) else None
        frame = frame.f_back
    return None


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        for t in a if isinstance(a, (list, tuple)) else (a,):
            if torch.is_tensor(t):
                yield t


class CommSpy:
    """install() wraps the collectives of torch.distributed (and of distributed_c10d, which torch's own
    deprecated names call); set `scenario` before each piece of work, read `violations` and `calls`."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.scenario = None
        self.violations = collections.defaultdict(list)
        self.calls = collections.defaultdict(collections.Counter)  # ops that came through comm.py
        self._local = threading.local()  # a collective's own nested calls are not counted again
        self._saved = []

    def install(self) -> "CommSpy":
        wrapped = {}
        for mod in (dist, distributed_c10d):
            for name in NAMES:
                real = getattr(mod, name, None)
                if real is None:
                    continue
                if id(real) not in wrapped:
                    wrapped[id(real)] = self._wrap(name, real)
                self._saved.append((mod, name, real))
                setattr(mod, name, wrapped[id(real)])
        return self

    def uninstall(self) -> None:
        for mod, name, real in reversed(self._saved):
            setattr(mod, name, real)
        self._saved = []

    def _wrap(self, name, real):
        @functools.wraps(real)
        def spy(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self._record(name, sys._getframe(1), args, kwargs)
            self._local.depth = depth + 1
            try:
                return real(*args, **kwargs)
            finally:
                self._local.depth = depth
        return spy

    def _record(self, name, frame, args, kwargs) -> None:
        found = caller(frame)
        if found is None:
            return
        path, line = found
        where = f"{path.relative_to(ROOT)}:{line}"
        bad = self.violations[self.scenario]
        if path != COMM_FILE:
            bad.append(f"{name} from {where}, not through qft_ds/comm.py")
            return
        self.calls[self.scenario][name] += 1
        for t in _tensors(args, kwargs):
            if t.device != self.device:
                bad.append(f"{name} from {where}: a tensor on {t.device}; the group serves {self.device}")
