"""Where one training step's time goes, for bench/memory_speed.py's --profile (torch profiler: CUDA kernels and
host ops) and --cprofile (cProfile: the host's Python), each over 2 steps, written next to the JSON."""
from __future__ import annotations

from pathlib import Path

import torch

import common


def profile(step, x, name, out_dir):
    """Where the time goes: top CUDA kernels and CPU ops over 2 steps, written next to the JSON."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(x)
        torch.cuda.synchronize()
    avg = prof.key_averages()
    n_kernels = sum(e.count for e in avg if e.device_type == torch.autograd.DeviceType.CUDA)
    # by device time (what the GPU does) and by own host time (what keeps a host-bound step busy)
    text = (f"{name}: {n_kernels / 2:.0f} CUDA kernel launches per step\n"
            f"{avg.table(sort_by='cuda_time_total', row_limit=30, max_name_column_width=60)}\n"
            f"{avg.table(sort_by='self_cpu_time_total', row_limit=40, max_name_column_width=60)}")
    path = Path(out_dir or common.RESULTS) / f"profile_{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text[:6000], flush=True)


def cprofile(step, x, name, out_dir):
    """Where the host time goes (Python, launches, syncs) over 2 steps: cProfile, top 40 by own time and top
    50 by cumulative time (tensor indexing runs through C slots that cProfile does not see as calls: its
    cost shows in the caller's own time). Backward runs on the calling thread here: cProfile sees only it."""
    import cProfile
    import io
    import pstats
    torch.autograd.set_multithreading_enabled(False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        step(x)
    torch.cuda.synchronize()
    prof.disable()
    torch.autograd.set_multithreading_enabled(True)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(60)
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(50)
    path = Path(out_dir or common.RESULTS) / f"cprofile_{name}.txt"
    path.write_text(buf.getvalue())
    print(buf.getvalue()[:5000], flush=True)
