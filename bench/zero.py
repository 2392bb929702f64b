"""ZeRO stages 0-3 of QFT on 1 and 2 GPUs: peak memory per GPU, total tokens/s, bytes communicated.

Each run starts its own ranks (torch.multiprocessing, NCCL), builds a random-init LLaMA shape weight
by weight on its GPU, quantizing each at once (bench/shapes.py), and trains through qft_ds.initialize
with "zero_optimization": {"stage": S} (bf16 compute, gradient checkpointing, fused flow). Measured after
setup (the setup peak is recorded apart): peak_gib per GPU (torch.cuda.max_memory_allocated, every
rank), tok_s over all ranks from the median step time, and the bytes handed to every torch.distributed
collective per step (qft_ds's and DeepSpeed's: inputs of all-reduce / reduce-scatter, outputs of
all-gather; a ring sends (world-1)/world of that per rank).

    python bench/zero.py --commit $(git rev-parse HEAD)                                  # the whole grid
    python bench/zero.py --runs 1.1b:1:0 1.1b:2:0 1.1b:2:1 1.1b:2:2 1.1b:2:3 --commit X   # a subset
    python bench/zero.py --runs 1.1b:1:0 1.1b:2:0 --batch 32 --sample   # another micro-batch; host stacks

A run is SHAPE:WORLD:STAGE[:DEPTH]; DEPTH sets stage 3's gather prefetch depth (qft_ds/zero/prefetch.py;
0: each weight gathered at its use), e.g. `1.1b:2:3:0` against `1.1b:2:3`. The default grid: the 1.1B
shape (bsz 8x512 per GPU) at stages 0-3 on 1 and 2 GPUs, and the 7B shape (bsz 1x512 per GPU) at stage 3
on 1 and 2 GPUs. Targets (issue 4): 7B stage 3
on 2 GPUs <= 9 GiB per GPU; 2-GPU tok/s >= 1.8x 1-GPU at the same per-GPU batch. At 8x512 the 1.1B step is
paced by the host, and so is the ratio (docs/benchmarks.md): --batch 16 or 32 measures data parallel
where the GPU sets the pace.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from shapes import SHAPES, build_quantized  # noqa: E402

DEFAULT_RUNS = [f"1.1b:{w}:{s}" for w in (1, 2) for s in (0, 1, 2, 3)] + ["7b:1:3", "7b:2:3"]
# collective -> (position, keyword) of the tensor(s) whose bytes count: the input of a reduction, the
# output of a gather (DeepSpeed's comm passes them by keyword, qft_ds by position)
_COLLECTIVES = {
    "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce_scatter_tensor": (1, "input"),
    "reduce_scatter_single": (1, "input"), "reduce_scatter": (1, "input_list"),
    "all_gather_into_tensor": (0, "output_tensor"), "all_gather_single": (0, "output_tensor"),
    "all_gather": (0, "tensor_list"),
}
COMM = {"bytes": 0, "calls": 0}


def count_collectives() -> None:
    """Wrap torch.distributed's collectives to count payload bytes (before qft_ds/DeepSpeed bind them)."""
    import torch.distributed as dist
    for name, (pos, key) in _COLLECTIVES.items():
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapped(*args, _real=real, _pos=pos, _key=key, **kwargs):
            t = args[_pos] if len(args) > _pos else kwargs.get(_key)
            for x in t if isinstance(t, (list, tuple)) else [t]:
                if torch.is_tensor(x):
                    COMM["bytes"] += x.numel() * x.element_size()
            COMM["calls"] += 1
            return _real(*args, **kwargs)
        setattr(dist, name, wrapped)


def config(stage: int, batch: int, comm_dtype: str = "fp32") -> dict:
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "bf16": {"enabled": True}, "steps_per_print": 10**9, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "QFTLion", "params": {"lr": 1e-5, "weight_decay": 0.1}},
            "communication_data_type": comm_dtype,
            "qft": {"backend": "auto", "gradient_checkpointing": True}}


def bind_cores(rank: int, world: int) -> list[int]:
    """Pin this rank to its own even share of the usable cores (as DeepSpeed's launcher does with
    --bind_cores_to_rank), with as many intra-op threads: no two ranks' host threads share a core."""
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // world)
    mine = cores[rank * share:(rank + 1) * share]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def thread_cpu() -> dict:
    """CPU seconds used so far by each thread of this process, {(tid, name): s}, from /proc (Linux; {} where
    there is none): which threads besides the main one burn a core while the ranks step (NCCL's proxy,
    autograd's device thread, OpenMP pools) and may slow a host-paced step down."""
    out, tick = {}, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[(task.name, name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def busiest_threads(before: dict, after: dict, wall: float, top: int = 6) -> list[dict]:
    """The threads that used the most CPU between two thread_cpu() readings, as a fraction of a core."""
    used = [(after[k] - before.get(k, 0.0), k) for k in after]
    return [{"thread": name, "tid": tid, "core_frac": round(s / wall, 3)}
            for s, (tid, name) in sorted(used, reverse=True)[:top] if wall > 0]


def profile_steps(step, out: Path | None, name: str, n: int = 2) -> None:
    """`n` more steps under torch.profiler (after the timed ones, so the timing has no profiler in it), each
    in a `timeline_step_<i>` annotation. Every rank that is given `out` writes the top ops by GPU time and
    by own host time, its gzipped Chrome trace, and step_timeline.analyse's reading of it (GPU busy and
    idle per step, the host's waits, the largest idle gaps and what the host ran at each)."""
    import gzip
    import json
    from torch.profiler import ProfilerActivity, profile, record_function
    from step_timeline import LABEL, analyse
    _sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            with record_function(f"{LABEL}{i}"):
                step()
                _sync()
    wall = time.perf_counter() - t0
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    (out / f"profile_{name}.txt").write_text(
        f"{n} steps, {wall:.3f} s wall under the profiler\n{avg.table(sort_by='cuda_time_total', row_limit=30)}\n"
        f"{avg.table(sort_by='self_cpu_time_total', row_limit=40)}\n")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    with gzip.open(out / f"trace_{name}.json.gz", "wt") as f:
        json.dump(trace, f)
    (out / f"timeline_{name}.json").write_text(json.dumps(analyse(trace), indent=1))


def worker(rank: int, world: int, port: int, shape: str, stage: int, warmup: int, iters: int, out: str,
           depth: int | None = None, profile_dir: str | None = None, comm_dtype: str = "fp32",
           bind: bool = False, overlap: int | None = None, sample: bool = False,
           batch: int | None = None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    cores = bind_cores(rank, world) if bind else None
    cuda = torch.cuda.is_available()  # False only under --cpu-smoke
    if cuda:
        torch.cuda.set_device(rank)
    else:
        import deepspeed.comm.torch  # noqa: F401
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the 34 s op build
    count_collectives()
    import qft_ds
    import torch.distributed as dist
    row = {"rank": rank, "oom": False, "cores": cores and f"{cores[0]}-{cores[-1]}"}
    try:
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        sh = SHAPES[shape]
        batch = batch or sh["batch"]
        # drawn and quantized one weight at a time on the GPU, the same seed on every rank (initialize broadcasts
        # rank 0's anyway): building a 7B shape on the CPU first took minutes per rank
        model = build_quantized(shape, dev)
        engine, opt, _, _ = qft_ds.initialize(model=model, config=config(stage, batch, comm_dtype))
        prefetcher = getattr(opt.sharding, "prefetcher", None)  # stage 3
        if depth is not None:
            prefetcher.depth = depth
        if overlap is not None and stage == 0:  # data parallel: all-reduces in flight inside backward
            opt.sharding.overlap = overlap
        st = opt.state_nbytes()
        row.update(state_bytes_per_param=(st["quantized_bytes"] + st["float_bytes"]) /
                   (st["quantized_params"] + st["float_params"]), params=st["quantized_params"] + st["float_params"],
                   setup_peak_gib=common.peak_gib())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(rank)
        times, host_times, comm_bytes = [], [], []
        def step():
            """One step; returns when the host had queued forward and backward. The optimizer's step ends
            in one host sync (its checks), so only this earlier moment says whether the host or the GPU
            set the pace: a host-bound step has queued its backward just before the GPU finished it."""
            x = torch.randint(0, sh["vocab_size"], (batch, sh["seq"]), generator=g).to(dev)
            engine.backward(engine(input_ids=x, labels=x).loss)
            queued = time.perf_counter()
            engine.step()
            return queued

        sampler = None
        for i in range(warmup + iters):
            dist.barrier()
            _sync()
            if i == warmup:
                cpu0, wall0 = thread_cpu(), time.perf_counter()
                if sample:  # the main thread's stack over the timed steps (bench/host_sampler.py)
                    from host_sampler import HostSampler
                    sampler = HostSampler().start()
            b0, t0 = COMM["bytes"], time.perf_counter()
            t_host = step()  # one sync inside before it: the loss check after forward
            _sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                host_times.append(t_host - t0)
                comm_bytes.append(COMM["bytes"] - b0)
        if sampler is not None:
            sampler.stop()
            row["host_samples"] = sampler.summary()
        row.update(peak_gib=common.peak_gib(), step_s=statistics.median(times), host_s=statistics.median(host_times),
                   comm_bytes_per_step=statistics.median(comm_bytes),
                   busy_threads=busiest_threads(cpu0, thread_cpu(), time.perf_counter() - wall0))
        if prefetcher is not None:  # misses should stay 0 after the first step
            row["prefetch"] = prefetcher.stats()
        if profile_dir:  # every rank steps (the steps communicate); rank 0 writes
            profile_steps(step, Path(profile_dir), f"{shape}_x{world}_z{stage}_rank{rank}")
    except torch.OutOfMemoryError:
        row.update(oom=True, peak_gib=common.peak_gib())
    except Exception as e:  # recorded; the other runs go on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.save(row, Path(out) / f"rank{rank}.pt")


def run(spec: str, args) -> dict:
    import torch.multiprocessing as mp
    shape, world, stage, *depth = spec.split(":")
    world, stage, depth = int(world), int(stage), int(depth[0]) if depth else None
    sh = SHAPES[shape]
    batch = args.batch or sh["batch"]
    row = {"model": shape, "world_size": world, "stage": stage, "method": f"qft_zero{stage}", "batch": batch,
           "seq": sh["seq"], "peak_gib": None, "peak_gib_per_rank": None, "tok_s": None, "oom": False}
    if depth is not None:
        row["prefetch_depth"] = depth
    row.update(comm_dtype=args.comm_dtype, bound_cores=args.bind, overlap=args.overlap if stage == 0 else None)
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        row["error"] = f"needs {world} GPUs, {torch.cuda.device_count()} visible"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(worker, args=(world, common_port(), shape, stage, args.warmup, args.iters, tmp, depth,
                                   args.profile, args.comm_dtype, args.bind, args.overlap, args.sample, batch),
                     nprocs=world)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        ranks = [torch.load(p, weights_only=False) for p in sorted(Path(tmp).glob("rank*.pt"))]
    if ranks:
        row["oom"] = any(r["oom"] for r in ranks)
        errors = [r["error"] for r in ranks if "error" in r]
        if errors:
            row["error"] = errors[0]
        peaks = [r.get("peak_gib") for r in ranks]
        row["peak_gib_per_rank"] = peaks
        row["peak_gib"] = max((p for p in peaks if p is not None), default=None)
        r0 = ranks[0]
        for key in ("setup_peak_gib", "state_bytes_per_param", "params", "step_s", "comm_bytes_per_step", "prefetch"):
            row[key] = r0.get(key)
        row["step_s_per_rank"] = [r.get("step_s") for r in ranks]  # lockstep: a slow host shows on every rank
        row["busy_threads_per_rank"] = [r.get("busy_threads") for r in ranks]
        row["host_samples_per_rank"] = [r.get("host_samples") for r in ranks]
        # forward and backward queued (the step's own sync comes after): near step_s when host-bound
        row["host_s_per_rank"] = [r.get("host_s") for r in ranks]
        row["cores_per_rank"] = [r.get("cores") for r in ranks]
        if r0.get("step_s"):
            row["tok_s"] = world * batch * sh["seq"] / r0["step_s"]
            row["comm_gb_per_step"] = r0["comm_bytes_per_step"] / 1e9
    print(f"  {shape:>5} x{world} stage {stage}: peak {row['peak_gib_per_rank']} GiB  tok/s "
          f"{row['tok_s'] and round(row['tok_s'])}  comm/step {row.get('comm_gb_per_step')} GB  oom={row['oom']} "
          f"{args.comm_dtype}{' bound' if args.bind else ''}{f' overlap {args.overlap}' if args.overlap else ''} "
          f"{row.get('error', '')}", flush=True)
    return row


def common_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    labels = [f"{r['model']}\nx{r['world_size']} z{r['stage']}" for r in rows]
    for ax, key, title in zip(axes, ("peak_gib", "tok_s", "comm_gb_per_step"),
                              ("peak GiB per GPU (max over ranks)", "tokens/s, all GPUs", "GB communicated per step")):
        vals = [r.get(key) or 0 for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=["C0" if r["world_size"] == 1 else "C1" for r in rows])
        for b, r in zip(bars, rows):
            if r["oom"] or r.get("error"):
                ax.text(b.get_x() + b.get_width() / 2, 0, "OOM" if r["oom"] else "err", ha="center", va="bottom",
                        color="red")
        if key == "peak_gib":
            ax.axhline(9, color="red", lw=0.8, ls="--")  # the 7B stage-3 target
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"qft_ds ZeRO ({result['device']}; blue 1 GPU, orange 2 GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="SHAPE:WORLD:STAGE, e.g. 7b:2:3")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed steps, profile 2 more on every rank and write, per rank, the top ops, the "
                        "gzipped Chrome trace and its GPU busy/idle reading (step_timeline.analyse) to DIR")
    p.add_argument("--comm_dtype", default="fp32", choices=("fp32", "bf16"),
                   help="the config's communication_data_type: the data-parallel gradient all-reduce's dtype")
    p.add_argument("--no-warm-machine", dest="warm_machine", action="store_false",
                   help="skip the discarded first run (by default the first --runs entry runs once more, first)")
    p.add_argument("--bind", action="store_true", help="pin each rank to its own even share of the cores")
    p.add_argument("--overlap", type=int, default=None,
                   help="stage 0: weights' all-reduces kept in flight inside backward (default: NoSharding's, 1)")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch per GPU for every run (default: the shape's, bench/shapes.py)")
    p.add_argument("--sample", action="store_true",
                   help="sample each rank's main-thread Python stack every 2 ms over the timed steps "
                        "(bench/host_sampler.py): where a host-paced step's time goes, without the profiler")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script end to end on the CPU with gloo (use the tiny shape; no memory figures)")
    args = p.parse_args(argv)
    for spec in args.runs:
        parts = spec.split(":")
        if (len(parts) not in (3, 4) or parts[0] not in SHAPES or parts[2] not in "0123" or not parts[1].isdigit()
                or (len(parts) == 4 and (parts[2] != "3" or not parts[3].isdigit()))):
            p.error(f"--runs: {spec!r} is not SHAPE:WORLD:STAGE[:DEPTH] with SHAPE in {', '.join(SHAPES)}, STAGE "
                    "0-3 and DEPTH (stage 3's prefetch depth) a number after stage 3 only")
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        sys.exit("zero.py measures GPU memory and NCCL traffic: it needs CUDA")
    result = common.header(args.commit)
    result["rows"] = []
    if args.warm_machine:  # the first run on a fresh machine ran ~30% slow in 4 calls: warm it, keep it apart
        print("warming the machine (discarded):", flush=True)
        result["warm_machine_run"] = run(args.runs[0], args)
    for spec in args.runs:
        result["rows"].append(run(spec, args))
        common.write_partial("zero", result, args.out)
    base = {r["model"]: r["tok_s"] for r in result["rows"] if r["world_size"] == 1 and r["stage"] == 0 and r["tok_s"]}
    same = {(r["model"], r["stage"]): r["tok_s"] for r in result["rows"] if r["world_size"] == 1 and r["tok_s"]}
    for r in result["rows"]:  # 2-GPU speed-up over 1 GPU at stage 0 and at the same stage, same per-GPU batch
        if r["tok_s"] and r["model"] in base:
            r["speedup_vs_1gpu_stage0"] = r["tok_s"] / base[r["model"]]
        if r["tok_s"] and r["world_size"] > 1 and (r["model"], r["stage"]) in same:
            r["speedup_vs_1gpu_same_stage"] = r["tok_s"] / same[(r["model"], r["stage"])]
    path = common.write_result("zero", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path}")
    print(f"{'model':>5} {'GPUs':>4} {'stage':>5} {'peak GiB':>9} {'tok/s':>8} {'x 1GPU':>7} {'x same':>7} "
          f"{'GB/step':>8} prefetch")
    for r in result["rows"]:
        peak = "OOM" if r["oom"] else (f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "err")
        print(f"{r['model']:>5} {r['world_size']:>4} {r['stage']:>5} {peak:>9} {r['tok_s'] or 0:8.0f} "
              f"{r.get('speedup_vs_1gpu_stage0') or 0:7.2f} {r.get('speedup_vs_1gpu_same_stage') or 0:7.2f} "
              f"{r.get('comm_gb_per_step') or 0:8.3f} {r.get('prefetch') or ''}")


if __name__ == "__main__":
    main()
