"""Session sweep (issue 15), kept as the record of bench/results/lion_regs_20261130-0927.json (a14058e with a
`maxnreg` launch knob passed through lion_step and triton_launch.Launcher; the knob was dropped since no
cap won, bench/NOTES.md, so this script no longer runs against the tree): lion_kernel_3d under Triton's register cap (maxnreg 56: 9 programs of 4 warps per
SM instead of 8, a few spills; 48: 10, more spills) against the compiler's choice (64 registers), int8 and
int4 momentum with 1% outliers, each timed back to back (lion_bandwidth.graph_ms, the fused flow's flag
and clip) and by do_bench, the copy in the same process; outputs checked bit-equal to the uncapped kernel's.

    python bench/sessions/lion_regs_20261130.py --commit SHA --out DIR
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from lion_bandwidth import graph_ms  # noqa: E402
from qft_ds.ops import get_ops, reference as ref  # noqa: E402

N = 4096 * 11008


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
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
    nbytes = {mb: N * (2 + 2 * mb / 8 + 2) + 2 * (N // 128 + N // 256) * 4 for mb in (8, 4)}

    def fresh(mb):
        return [w0.clone(), ws0.clone(), moms[mb][0].clone(), moms[mb][1].clone(), o_val0.clone()]

    def step(st, mb, reg, rounds, graph):
        w, ws, mc, msc, ov = st
        kw = dict(lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0, step=7, offset=0,
                  momentum_bits=mb, outlier_idx=o_idx, outlier_val=ov, layout="3d", fused_outliers=True,
                  rand_bits=16, philox_rounds=rounds, maxnreg=reg, **(dict(finite=norm, clip=1.0) if graph else {}))
        return lambda: ops.lion_step(w, ws, 128, mc, msc, 256, g, **kw)

    for mb in (8, 4):
        for rounds in (10, 7):
            first = None
            for reg in (None, 56, 48, None):  # the uncapped kernel again last: the clocks drift
                st = fresh(mb)
                step(st, mb, reg, rounds, True)()
                torch.cuda.synchronize()
                same = None if first is None else all(torch.equal(a, b) for a, b in zip(first, st))
                first = first or st
                t_graph = graph_ms(step(fresh(mb), mb, reg, rounds, True))
                t_bench = do_bench(step(fresh(mb), mb, reg, rounds, False), return_mode="median")
                row = {"momentum_bits": mb, "philox_rounds": rounds, "maxnreg": reg, "same_bits": same,
                       "ms_graph": t_graph, "frac_of_copy_graph": nbytes[mb] / t_graph / 1e6 / out["copy_gbs"],
                       "ms_do_bench": t_bench, "frac_of_copy_do_bench": nbytes[mb] / t_bench / 1e6 / out["copy_gbs"]}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    out["copy_gbs_end"] = 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), return_mode="median") / 1e6
    print(f"wrote {common.write_result('lion_regs', out, args.out)}")


if __name__ == "__main__":
    main()
