"""Host cost of the fused flow's per-weight hook under data parallel (stage 0) and ZeRO-3, on 2 ranks, for
an older commit's package against the working tree's (issue 16).

The 1.1B step is host-bound, and the profile of 2 GPUs (bench/results/profile_1.1b_x2_z0.txt) puts
`_DeliverGradBackward` at ~0.38 ms more host time per weight than on one GPU. This bench isolates that
hook: each rank delivers bf16 gradients of a converted model's weights, last layer first, as backward
does, and times the deliveries (reduction started, previous weight's reduction finished, its norm, its
Lion update; at stage 3 the re-gather too). Subtracted from the time: waits for a collective's data
(transfer latency, not host work; on a GPU the wait does not block the host) and the Lion update's own
call (the CPU reference runs ~40 torch ops where a GPU launches one Triton kernel; it is the same at any
world size). Weights are small, so on the CPU the kernels cost little and what is timed is the ops'
dispatch and the Python around them; each delivery's aten ops are counted with a TorchDispatchMode
(the update's included).

Each configuration runs with `deepspeed.comm` initialised (as under DeepSpeed's engine, the training
path) and without it (torch.distributed), and once on one process (no group): the data-parallel extra
is the 2-rank time minus the one-process time. The collectives' own call path is timed alone too
(`call_us`: the launch of one all-reduce mean of a 4-element tensor, waits not counted).

    python bench/dp_hook_host.py --old 312c229                    # 2 gloo ranks on the CPU
    python bench/dp_hook_host.py --old .old312 --backend nccl     # 2 GPUs (.old312: the extracted tree)
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]
import common  # noqa: E402

# a scaled-down LLaMA (fused q/k/v and gate/up, as the 1.1B run): weights big enough to be real tensors,
# small enough that a CPU kernel costs little next to its dispatch
MODEL = dict(vocab=128, hidden=32, layers=4, tie=False)  # untied, as the 1.1B shape
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor",
               "all_gather_single", "broadcast")
VIEWS = {"view", "_unsafe_view", "slice", "split", "split_with_sizes", "detach", "alias", "as_strided", "unbind",
         "empty", "expand", "t", "reshape", "select", "lift_fresh"}  # no kernel: metadata or an allocation only


# the calling thread's CPU time, not wall time: on 2 shared cores each rank's main thread is descheduled
# for milliseconds while the other rank and the backends' own threads run, which wall time would count
_clock = time.thread_time


class _Blocked:
    """Wraps torch.distributed's collectives (looked up at call time by qft_ds.comm and deepspeed.comm):
    the time a wait() blocks, or a synchronous call takes, is summed in `seconds`."""

    def __init__(self, sync):
        self.seconds, self.sync = 0.0, sync

    def install(self, dist) -> None:
        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            if not kwargs.get("async_op"):
                t0 = _clock()
                out = real(*args, **kwargs)
                self.sync()
                self.seconds += _clock() - t0
                return out
            return _TimedWork(real(*args, **kwargs), self)
        return call


class _TimedWork:
    def __init__(self, work, owner):
        self.work, self.owner = work, owner

    def wait(self, *args):
        t0 = _clock()
        out = self.work.wait(*args)
        self.owner.sync()  # NCCL: the wait only orders streams; the transfer is then what the sync waits for
        self.owner.seconds += _clock() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.work, name)


def _tree(commit: str) -> Path:
    """The package of `commit` (qft_ds/ and ops/, laid out as installed) in a temporary folder."""
    data = subprocess.run(["git", "archive", commit, "qft_ds", "ops"], cwd=ROOT, capture_output=True,
                          check=True).stdout
    root = Path(tempfile.mkdtemp(prefix="qft_old_"))
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    return root


def _worker(rank, world, port, backend, pkg, old_comm, path, stage, steps, out):
    torch.set_num_threads(1)
    sys.path.insert(0, pkg)  # this commit's qft_ds, before the installed one
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(rank)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cpu" and len(os.sched_getaffinity(0)) >= world:  # one core per rank: less interference
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    if world > 1:
        dist.init_process_group(backend, rank=rank, world_size=world)
        if path == "deepspeed":
            if dev.type == "cpu":
                import deepspeed.comm.torch  # noqa: F401
                sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the 34 s op build
            import deepspeed
            deepspeed.init_distributed(dist_backend=backend)
    import qft_ds
    assert str(Path(qft_ds.__file__).resolve()).startswith(str(Path(pkg).resolve())), qft_ds.__file__
    from qft_ds import comm
    from qft_ds.config import QFTConfig
    from qft_ds.engine import build_optimizer
    from qft_ds.flow import deliver
    from qft_ds.nn import convert_model, quantized_weights
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama
    blocked = _Blocked(sync)
    blocked.install(dist)
    torch.manual_seed(0)
    model = make_tiny_llama(**MODEL).to(dev)
    convert_model(model, group_size=32, outlier_frac=0.01)
    cfg = QFTConfig(flow="fused", block_size=64, max_grad_norm=1.0)
    cfg.zero_stage = stage if world > 1 else 0
    opt = build_optimizer(model, cfg, {"lr": 1e-4, "weight_decay": 0.1})
    if cfg.zero_stage:
        opt.shard()
    opt.init_state()
    update = opt.ops.lion_step  # the Lion update itself (one Triton launch on a GPU, the same at any world size)

    def timed_update(*args, **kwargs):
        sync()
        t0 = _clock()
        update(*args, **kwargs)
        sync()
        blocked.seconds += _clock() - t0
    opt.ops.lion_step = timed_update
    launch = {"s": 0.0}  # the strategies' reduction launches, in situ (looked up on comm at call time)
    for name in ("all_reduce_mean_async", "reduce_scatter_mean_async"):
        def timed_launch(*args, _real=getattr(comm, name), **kwargs):
            t0 = _clock()
            try:
                return _real(*args, **kwargs)
            finally:
                launch["s"] += _clock() - t0
        setattr(comm, name, timed_launch)
    weights = list(reversed(quantized_weights(model)))
    g = torch.Generator(device=dev).manual_seed(1)
    # one bf16 gradient per weight, as backward delivers it (a fused weight is read by one matmul: all uses)
    grads = [torch.randn(w.shape, generator=g, device=dev).mul_(1e-3).to(torch.bfloat16) for w in weights]
    n = len(weights)
    per_delivery, launches, ops = [], [], None

    for step in range(steps):
        copies = [gr.clone() for gr in grads]  # outside the timed region, as autograd makes them
        sync()
        blocked.seconds = launch["s"] = 0.0
        t0 = _clock()
        for w, gr in zip(weights, copies):
            deliver(w, gr, w.n_uses)
        sync()
        elapsed = _clock() - t0 - blocked.seconds
        if step >= 2:  # the first steps allocate momentum and warm up caches
            per_delivery.append(elapsed / n)
            launches.append(launch["s"] / n)
        if step == 2:
            copies = [gr.clone() for gr in grads]
            with common.OpNames() as c:
                for w, gr in zip(weights, copies):
                    deliver(w, gr, w.n_uses)
            ops = collections.Counter(c.ops)
        for p in model.parameters():  # float parameters: no gradient, step() updates the quantized only
            p.grad = None
        opt.step()
    call = _call_paths(dist, comm, common.module_from_source(old_comm, "comm_old"), dev, sync) if world > 1 else None
    row = {"world": world, "stage": cfg.zero_stage, "path": path if world > 1 else "one process",
           "deliveries": n, "host_us_per_delivery": 1e6 * statistics.median(per_delivery),
           "host_us_per_delivery_min": 1e6 * min(per_delivery),
           "host_us_per_delivery_all": [round(1e6 * x, 1) for x in per_delivery],
           "aten_ops_per_delivery": sum(ops.values()) / n,
           "kernels_per_delivery": sum(v for k, v in ops.items() if k not in VIEWS) / n,
           "ops": dict(ops.most_common()), "launch_us_per_delivery": 1e6 * statistics.median(launches),
           "launch_us_per_delivery_min": 1e6 * min(launches),
           "call_us": call}
    if rank == 0:
        torch.save(row, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _call_paths(dist, comm, old_comm, dev, sync, n=50, rounds=9) -> dict:
    """Host CPU time of one all-reduce, launch and wait() (a wait's blocking costs the thread no CPU time
    on gloo), fastest of `rounds` batches of `n`, in one process: c10d's own Python and launch; through
    deepspeed.comm (where initialised); the mean of a bf16 tensor (the hot path: the cast, the device
    check, the routing, the launch, the divide if any) by the older commit's qft_ds/comm.py and by this
    run's."""
    t32 = torch.ones(4, device=dev)
    t16 = torch.ones(4, device=dev, dtype=torch.bfloat16)
    paths = {"c10d": lambda: dist.all_reduce(t32, async_op=True),
             "old comm mean (bf16)": lambda: old_comm.all_reduce_mean_async(t16),
             "comm mean (bf16)": lambda: comm.all_reduce_mean_async(t16)}
    ds = sys.modules.get("deepspeed.comm")
    if ds is not None and ds.is_initialized():
        paths["deepspeed.comm"] = lambda: ds.all_reduce(t32, async_op=True)
    best = dict.fromkeys(paths, float("inf"))
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # interleaved, each first in turn
            launch = paths[name]
            sync()
            t0 = _clock()
            pending = [launch() for _ in range(n)]
            for p in pending:
                p.wait()
            best[name] = min(best[name], (_clock() - t0) / n)
    return {k: round(1e6 * v, 2) for k, v in best.items()}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the commit whose package is compared with the working tree's, "
                    "or a folder holding its qft_ds/ and ops/ (a copy without git history: `git archive COMMIT "
                    "qft_ds ops | tar -x -C FOLDER` beforehand)")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--steps", type=int, default=12, help="backward passes per run (the first 2 not timed)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each configuration, old and new alternating")
    ap.add_argument("--stages", default="0,3")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    if args.backend == "gloo":
        os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    old_root = Path(args.old) if Path(args.old).is_dir() else _tree(args.old)
    if not (old_root / "qft_ds" / "comm.py").is_file():
        raise FileNotFoundError(f"--old {args.old}: no qft_ds/comm.py in {old_root}")
    if not (old_root / "qft_ds" / "ops").exists():  # laid out as installed: qft_ds.ops is the ops/ folder
        (old_root / "qft_ds" / "ops").symlink_to((old_root / "ops").resolve(), target_is_directory=True)
    pkgs = {"old": str(old_root), "new": str(ROOT)}
    old_comm = (old_root / "qft_ds" / "comm.py").read_text()
    configs = [(1, "torch", 0)] + [(2, p, int(s)) for s in args.stages.split(",") for p in ("torch", "deepspeed")]
    rows = []
    out = Path(tempfile.mkdtemp()) / "row.pt"
    for rnd in range(args.rounds):
        for world, path, stage in configs:
            for impl, pkg in pkgs.items():
                out.unlink(missing_ok=True)
                try:
                    mp.spawn(_worker, args=(world, _port(), args.backend, pkg, old_comm, path, stage, args.steps, str(out)),
                             nprocs=world, join=True)
                    teardown = None
                except mp.ProcessExitedException as e:  # gloo's teardown at exit aborts now and then
                    if not out.exists():
                        raise
                    teardown = str(e)  # the row was written before it: kept, and the abort recorded
                row = {"impl": impl, "round": rnd, **torch.load(out), "teardown_error": teardown}
                rows.append(row)
                print(f"{impl:3s} world {world} stage {row['stage']} {row['path']:11s} "
                      f"host {row['host_us_per_delivery']:7.1f} us/delivery  aten ops {row['aten_ops_per_delivery']:5.1f}"
                      f"  kernels {row['kernels_per_delivery']:5.1f}  launch {row['launch_us_per_delivery']:5.1f} us"
                      f"  call {row['call_us']}", flush=True)
    path = common.write_result("dp_hook_host", {**common.header(args.commit), "old": args.old,
                                                 "backend": args.backend, "model": MODEL, "rows": rows})
    print(path)


if __name__ == "__main__":
    main()
