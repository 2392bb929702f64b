"""ZeRO-3's per-use weight gather on 2 ranks: torch ops, kernels and host time of packing and unpacking,
for an older commit's `qft_ds/zero/shards.py` against the working tree's (issue 16).

The training step is host-bound (bench/NOTES.md: ~10 us of host time per torch op on the GPU machines),
so the cost that stage 3 adds per use of a weight is mostly the ops around its one collective. Each rank
gathers a converted weight of the LLaMA-1.1B shapes N times; counted with a TorchDispatchMode: every aten
op, and those that write memory (kernels on a GPU). Timed: the gather minus its collective (the
collective is wrapped and its time subtracted), median over N.

    python bench/zero3_gather_host.py --old 2b68aa4                     # 2 gloo ranks on the CPU
    python bench/zero3_gather_host.py --old 2b68aa4 --backend nccl      # 2 GPUs
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import common  # noqa: E402

SHAPES = {"k_proj": (256, 2048), "q_proj": (2048, 2048), "gate_up": (11264, 2048)}  # LLaMA-1.1B weights
VIEWS = {"view", "_unsafe_view", "slice", "split", "split_with_sizes", "detach", "alias", "as_strided", "unbind",
         "empty", "expand", "t", "reshape", "select"}  # no kernel: metadata or an allocation only


def _worker(rank, world, port, backend, old_source, repeats, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    from qft_ds import comm
    from qft_ds.quant.hybrid import HybridWeight
    from qft_ds.zero import shards as new_shards
    from qft_ds.zero.partition import Partition
    collective = {"s": 0.0}
    real = comm.all_gather_bytes_async if hasattr(comm, "all_gather_bytes_async") else None

    def timed(fn):
        def run(*a, **k):
            sync()
            t0 = time.perf_counter()
            r = fn(*a, **k)
            if hasattr(r, "wait"):
                r.wait()
            sync()
            collective["s"] += time.perf_counter() - t0
            return r
        return run

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    if real is None:
        raise RuntimeError("qft_ds.comm has no all_gather_bytes_async: run this from a commit that has it")
    comm.all_gather_bytes_async = timed(real)  # the old shards' all_gather_bytes calls it too
    impls = {"old": common.module_from_source(old_source, "shards_old"), "new": new_shards}
    rows = []
    for shape_name, shape in SHAPES.items():
        for impl, mod in impls.items():
            torch.manual_seed(0)
            w = HybridWeight(torch.randn(shape) * 0.02, group_size=128, outlier_frac=0.01).to(dev)
            sh = mod.WeightShard(w, Partition(w.numel, w.group, 256, world, rank), 3)
            full = sh.gather_full()
            with common.OpNames() as c:
                sh.gather_full()
            ops = c.ops
            times = []
            for _ in range(repeats):
                collective["s"] = 0.0
                sync()
                t0 = time.perf_counter()
                full = sh.gather_full()
                sync()
                times.append(time.perf_counter() - t0 - collective["s"])
            rows.append({"weight": shape_name, "shape": list(shape), "impl": impl, "aten_ops": len(ops),
                         "kernels": sum(1 for o in ops if o not in VIEWS), "ops": ops,
                         "host_us_without_collective": 1e6 * statistics.median(times)})
            del full
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the commit whose qft_ds/zero/shards.py is compared")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    old_source = subprocess.run(["git", "show", f"{args.old}:qft_ds/zero/shards.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "rows.pt"
    mp.spawn(_worker, args=(2, port, args.backend, old_source, args.repeats, str(out)), nprocs=2, join=True)
    rows = torch.load(out)
    for r in rows:
        print(f"{r['weight']:8s} {r['impl']:4s} aten ops {r['aten_ops']:3d}  kernels {r['kernels']:3d}  "
              f"host {r['host_us_without_collective']:8.1f} us")
    path = common.write_result("zero3_gather_host", {**common.header(args.commit), "old": args.old,
                                                      "backend": args.backend, "world": 2, "rows": rows})
    print(path)


if __name__ == "__main__":
    main()
