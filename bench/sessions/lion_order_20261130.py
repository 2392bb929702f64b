"""Session A/B (issue 15): lion_kernel_3d with its loads ordered against the tree's (HEAD) kernel, in one process
with the copy: `va`, every tile load volatile and first in the source, the finite flag gating only the stores,
so that the outliers' pointer chase waits behind the tile's loads instead of before them; `vb`, only the
outliers' pointers volatile. The variants were untracked copies of ops/triton_kernels.py (ops/_lion_va.py,
ops/_lion_vb.py, deleted after the run: both were slower, bench/NOTES.md), so this script is the record of
bench/results/lion_order_20261130-0930.json. int8 and int4 momentum, 1% outliers, timed back to
back (lion_bandwidth.graph_ms) and by do_bench; outputs checked bit-equal to HEAD's.

    python bench/sessions/lion_order_20261130.py --commit SHA --out DIR
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from lion_bandwidth import graph_ms  # noqa: E402
from qft_ds.ops import get_ops, reference as ref  # noqa: E402
from qft_ds.ops import triton_backend as tb  # noqa: E402
from qft_ds.ops.triton_launch import Launcher  # noqa: E402

N = 4096 * 11008


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--variants", default="va,vb")
    args = p.parse_args()
    dev = torch.device("cuda")
    kernels = {"head": None, **{v: Launcher(importlib.import_module(f"qft_ds.ops._lion_{v}").lion_kernel_3d)
                                for v in args.variants.split(",")}}
    x = torch.randn(2**28, device=dev)
    y = torch.empty_like(x)
    out = {**common.header(args.commit), "n": N, "rows": [],
           "copy_gbs": 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), return_mode="median") / 1e6}
    gen = torch.Generator(device=dev).manual_seed(0)
    w0, ws0 = ref.quantize_blockwise(torch.randn(N, device=dev, generator=gen) * 0.02, 128)
    moms = {8: ref.quantize_blockwise(torch.randn(N, device=dev, generator=gen) * 1e-3, 256),
            4: ref.quantize_momentum(torch.randn(N, device=dev, generator=gen) * 1e-3, 256, 1, 0, bits=4)}
    g = (torch.randn(N, device=dev, generator=gen) * 1e-2).bfloat16()
    o_idx = torch.randperm(N, device=dev, generator=gen)[: N // 100].sort().values.to(torch.int32)
    w0[o_idx.long()] = 0
    o_val0 = torch.randn(N // 100, device=dev, generator=gen) * 0.05
    norm = torch.tensor(0.5, device=dev)
    ops = get_ops("triton", dev)
    orig = tb._kernel
    nbytes = {mb: N * (2 + 2 * mb / 8 + 2) + 2 * (N // 128 + N // 256) * 4 for mb in (8, 4)}

    def fresh(mb):
        return [w0.clone(), ws0.clone(), moms[mb][0].clone(), moms[mb][1].clone(), o_val0.clone()]

    def step(st, mb, kernel, rounds, graph, finite=None):
        w, ws, mc, msc, ov = st
        flow = dict(finite=norm if finite is None else finite, clip=1.0) if graph else {}
        kw = dict(lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0, step=7, offset=0,
                  momentum_bits=mb, outlier_idx=o_idx, outlier_val=ov, layout="3d", fused_outliers=True,
                  rand_bits=16, philox_rounds=rounds, **flow)
        pick = orig if kernel is None else (lambda name: kernel if name == "lion_kernel_3d" else orig(name))

        def run():
            tb._kernel = pick
            try:
                ops.lion_step(w, ws, 128, mc, msc, 256, g, **kw)
            finally:
                tb._kernel = orig
        return run

    for mb in (8, 4):
        for rounds in (10, 7):
            first = None
            for name in [*kernels, "head"]:  # HEAD again last: the clocks drift
                st = fresh(mb)
                step(st, mb, kernels[name], rounds, True)()
                torch.cuda.synchronize()
                same = None if first is None else all(torch.equal(a, b) for a, b in zip(first, st))
                first = first or st
                nan = fresh(mb)  # a non-finite norm writes nothing
                step(nan, mb, kernels[name], rounds, True, torch.tensor(float("nan"), device=dev))()
                untouched = all(torch.equal(a, b) for a, b in zip(fresh(mb), nan))
                t_graph = graph_ms(step(fresh(mb), mb, kernels[name], rounds, True))
                t_bench = do_bench(step(fresh(mb), mb, kernels[name], rounds, False), return_mode="median")
                row = {"momentum_bits": mb, "philox_rounds": rounds, "kernel": name, "same_bits_as_head": same,
                       "nan_norm_writes_nothing": untouched, "ms_graph": t_graph,
                       "frac_of_copy_graph": nbytes[mb] / t_graph / 1e6 / out["copy_gbs"], "ms_do_bench": t_bench,
                       "frac_of_copy_do_bench": nbytes[mb] / t_bench / 1e6 / out["copy_gbs"]}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    out["copy_gbs_end"] = 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), return_mode="median") / 1e6
    print(f"wrote {common.write_result('lion_order', out, args.out)}")


if __name__ == "__main__":
    main()
