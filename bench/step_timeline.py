"""Where a training step's wall time goes: GPU busy, GPU idle and host waits, from a profiler trace.

A step is host-bound where the GPU idles (the host has not launched the next kernel yet) and GPU-bound
where the host waits in a sync. For each method this profiles a few steps (torch.profiler, CPU + CUDA)
after warm-up and reads the trace:
- `gpu_busy_ms`: union of kernel, memcpy and memset intervals inside the step;
- `gpu_idle_ms`: the rest of the step's span;
- `host_wait_ms`: time in CUDA synchronize / blocking memcpy calls (the host idle, the GPU working);
- the largest GPU-idle gaps, each with the CPU ops running when it began (what the host was doing),
  and the idle time summed by the outermost op at each gap's start.

The profiler adds host time to every op, so absolute times run higher than in `memory_speed.py`; the
comparison between methods of one run is what counts.

    python bench/step_timeline.py --methods fp32_adamw qft qft_sync --commit $(git rev-parse HEAD)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from memory_speed import METHODS, SHAPES, clear_env, method_env, setup  # noqa: E402

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
WAITS = ("Synchronize", "cudaMemcpy", "cuMemcpyDtoH")  # host calls that block until the GPU catches up
LABEL = "timeline_step_"


def _union(intervals):
    """Merged, sorted (start, end) intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def analyse(trace: dict, min_gap_us: float = 200.0, top: int = 8) -> list[dict]:
    """Per profiled step (a `timeline_step_<i>` annotation): busy, idle, waits and the largest idle gaps."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith(LABEL)),
                   key=lambda e: e["ts"])
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") in GPU_CATS]
    ops = [e for e in ev if e.get("cat") == "cpu_op"]
    runtime = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    out = []
    for s in steps:
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        busy = _union([(max(a, t0), min(b, t1)) for a, b in gpu if b > t0 and a < t1])
        gaps, prev = [], t0
        for a, b in busy:
            if a - prev >= min_gap_us:
                gaps.append((prev, a))
            prev = b
        if t1 - prev >= min_gap_us:
            gaps.append((prev, t1))
        by_op = defaultdict(float)
        described = []
        for a, b in sorted(gaps, key=lambda g: g[0] - g[1]):
            running = sorted((o for o in ops if o["ts"] <= a < o["ts"] + o["dur"]), key=lambda o: -o["dur"])
            outer = running[0]["name"] if running else "(no cpu op: Python between ops)"
            by_op[outer] += (b - a) / 1e3
            if len(described) < top:
                described.append({"at_ms": round((a - t0) / 1e3, 2), "ms": round((b - a) / 1e3, 3),
                                  "outer_op": outer, "inner_op": running[-1]["name"] if running else None})
        waits = [r for r in runtime if t0 <= r["ts"] < t1 and any(w in r["name"] for w in WAITS)]
        out.append({
            "step_ms": round(s["dur"] / 1e3, 2),
            "gpu_busy_ms": round(sum(b - a for a, b in busy) / 1e3, 2),
            "gpu_idle_ms": round((s["dur"] - sum(b - a for a, b in busy)) / 1e3, 2),
            "idle_in_gaps_over_min_ms": round(sum(b - a for a, b in gaps) / 1e3, 2),
            "host_wait_ms": round(sum(r["dur"] for r in waits) / 1e3, 2),
            "host_waits": len(waits),
            "kernels": sum(1 for a, b in gpu if t0 <= a < t1),
            "largest_gaps": described,
            "idle_by_outer_op_ms": dict(sorted(((k, round(v, 2)) for k, v in by_op.items()),
                                               key=lambda kv: -kv[1])[:12]),
        })
    return out


def profile_method(method: str, shape: str, steps: int, warmup: int, dev: str):
    from torch.profiler import ProfilerActivity, profile, record_function
    method_env(method)
    batch, seq = SHAPES[shape]["batch"], SHAPES[shape]["seq"]
    step = setup(method, shape, batch, seq, dev)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g).to(dev)
    for _ in range(warmup):
        step(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            with record_function(f"{LABEL}{i}"):
                step(x)
                torch.cuda.synchronize()
    clear_env()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    return analyse(trace), trace


def summary(per_step: list[dict]) -> dict:
    keys = ("step_ms", "gpu_busy_ms", "gpu_idle_ms", "host_wait_ms", "kernels")
    return {k: statistics.median(s[k] for s in per_step) for k in keys}


def plot(result: dict, traces: dict, path: Path) -> None:
    """One profiled step per method: GPU busy intervals on a time axis, host waits below them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(traces)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(names)))
    for row, m in enumerate(names):
        ev = [e for e in traces[m]["traceEvents"] if e.get("ph") == "X" and "dur" in e]
        step = min((e for e in ev if e.get("cat") == "user_annotation" and e["name"] == f"{LABEL}1"),
                   key=lambda e: e["ts"])
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        busy = _union([(max(e["ts"], t0), min(e["ts"] + e["dur"], t1)) for e in ev
                       if e.get("cat") in GPU_CATS and e["ts"] + e["dur"] > t0 and e["ts"] < t1])
        waits = [(e["ts"], e["dur"]) for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")
                 and t0 <= e["ts"] < t1 and any(w in e["name"] for w in WAITS)]
        ax.broken_barh([((a - t0) / 1e3, (b - a) / 1e3) for a, b in busy], (row - 0.35, 0.4), color="tab:green")
        ax.broken_barh([((a - t0) / 1e3, d / 1e3) for a, d in waits], (row + 0.1, 0.25), color="tab:red")
        s = result["methods"][m]["median"]
        ax.text((t1 - t0) / 1e3 + 2, row, f"median {s['step_ms']:.0f} ms, GPU busy {s['gpu_busy_ms']:.0f}", va="center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("ms from the start of the step (green: GPU busy; red: host waiting for the GPU)")
    ax.set_title(f"{result['model']} bsz {result['batch']}x{result['seq']}, {result['device']}, "
                 f"{result['commit'][:7]} (under the profiler)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["fp32_adamw", "qft"], choices=METHODS)
    p.add_argument("--shape", default="1.1b", choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=4, help="profiled steps per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the plot shows the second profiled step)")
    if not torch.cuda.is_available():
        sys.exit("step_timeline.py profiles CUDA kernels: it needs CUDA")
    common.single_process_env()
    result = common.header(args.commit)
    result.update(model=args.shape, batch=SHAPES[args.shape]["batch"], seq=SHAPES[args.shape]["seq"],
                  methods={})
    traces = {}
    for m in args.methods:
        per_step, traces[m] = profile_method(m, args.shape, args.steps, args.warmup, "cuda")
        result["methods"][m] = {"median": summary(per_step), "steps": per_step}
        med = result["methods"][m]["median"]
        print(f"{m:>12}: step {med['step_ms']:.1f} ms, GPU busy {med['gpu_busy_ms']:.1f}, idle "
              f"{med['gpu_idle_ms']:.1f}, host waiting {med['host_wait_ms']:.1f}, {med['kernels']:.0f} kernels",
              flush=True)
        print("    idle by op: " + json.dumps(per_step[1]["idle_by_outer_op_ms"])[:600], flush=True)
        torch.cuda.empty_cache()
    path = common.write_result("step_timeline", result, args.out)
    plot(result, traces, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
