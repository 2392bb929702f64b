"""Session A/B for the Lion kernel (issue 15): lion_kernel_3d of the working tree ("head") against other
versions of it, in one process with the copy, on one LLaMA-7B MLP weight with 1% outliers, int8 and int4
momentum, 10 and 7 Philox rounds. Each version is an untracked copy of ops/triton_kernels.py (and, where it
differs, of triton_rng.py and triton_momentum.py, their imports pointed at each other) carried as
ops/_lion_<name>.py; `--kernels a,b` times the tree's kernel, qft_ds.ops._lion_a and _lion_b, and the
tree's again. Each is timed back to back as the fused flow launches it (lion_bandwidth.graph_ms: the
gradient's norm as the flag, a clipping budget) and by do_bench, and its outputs are compared with the
tree's (codes, scales, outliers), and a non-finite norm must write nothing.

    python bench/sessions/lion_kernel_ab_20261130.py --kernels before --commit SHA --out DIR

Results: lion_pack_20261130-0911/-0917.json (cb852f9 as "before" against the tree as "after", rows named
so by the first version of this script) and lion_order_20261130-0930.json (two load orders, va and vb).
Other session A/Bs of that day ran against code that was not kept, with scripts only in git history:
lion_persist_20261130-0904.json (programs of several chunks) and lion_regs_20261130-0927.json (a
`maxnreg` knob), both from bench/sessions/ at commit 53b2ee3.
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
from lion_bandwidth import copy_gbs, graph_ms, lion_bytes, weight_inputs  # noqa: E402
from qft_ds.ops import get_ops  # noqa: E402
from qft_ds.ops import triton_backend as tb  # noqa: E402
from qft_ds.ops.triton_launch import Launcher  # noqa: E402

N = 4096 * 11008


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--kernels", required=True, help="comma-separated names of ops/_lion_<name>.py")
    args = p.parse_args()
    dev = torch.device("cuda")
    names = args.kernels.split(",")
    kernels = {"head": None, **{v: Launcher(importlib.import_module(f"qft_ds.ops._lion_{v}").lion_kernel_3d)
                                for v in names}}
    out = {**common.header(args.commit), "n": N, "rows": [], "copy_gbs": copy_gbs(dev)}
    inp = weight_inputs(dev, N, torch.Generator(device=dev).manual_seed(0))
    w0, ws0, g, o_idx, o_val0 = inp["w"], inp["ws"], inp["g"], inp["o_idx"], inp["o_val"]
    w0[o_idx.long()] = 0  # the hybrid invariant: an outlier's dense code is 0
    moms = {8: inp["m8"], 4: inp["m4"]}
    norm = torch.tensor(0.5, device=dev)
    ops = get_ops("triton", dev)
    orig = tb._kernel

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
            for name in ["head", *names, "head"]:  # the tree's again last: the clocks drift
                st = fresh(mb)
                step(st, mb, kernels[name], rounds, True)()
                torch.cuda.synchronize()
                row = {"momentum_bits": mb, "philox_rounds": rounds, "kernel": name}
                if first is None:
                    first = st
                else:
                    row["same_bits_as_head"] = all(torch.equal(a, b) for a, b in zip(first, st))
                    row["w_codes_differing"] = (first[0] != st[0]).float().mean().item()
                    row["m_codes_differing"] = (first[2] != st[2]).float().mean().item()
                    row["outliers_max_abs_diff"] = (first[4] - st[4]).abs().max().item()
                nan = fresh(mb)
                step(nan, mb, kernels[name], rounds, True, torch.tensor(float("nan"), device=dev))()
                row["nan_norm_writes_nothing"] = all(torch.equal(a, b) for a, b in zip(fresh(mb), nan))
                t_graph = graph_ms(step(fresh(mb), mb, kernels[name], rounds, True))
                t_bench = do_bench(step(fresh(mb), mb, kernels[name], rounds, False), return_mode="median")
                nbytes = lion_bytes(N, mb)
                row.update(ms_graph=t_graph, frac_of_copy_graph=nbytes / t_graph / 1e6 / out["copy_gbs"],
                           ms_do_bench=t_bench, frac_of_copy_do_bench=nbytes / t_bench / 1e6 / out["copy_gbs"])
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    out["copy_gbs_end"] = copy_gbs(dev)
    print(f"wrote {common.write_result('lion_kernel_ab', out, args.out)}")


if __name__ == "__main__":
    main()
