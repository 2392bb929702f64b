"""Session A/B (issue 15, the Lion kernel at >= 80% of copy): the working tree's lion_kernel_3d against
cb852f9's (copies of that commit's ops/triton_kernels.py, triton_rng.py and triton_momentum.py carried
untracked as ops/_lion_before.py, _rng_before.py and _momentum_before.py, their imports pointed at each
other; same arguments), at 10 and 7 Philox rounds, int8 and int4 momentum with 1% outliers, in one process
with the copy. Each is timed back to back as the fused flow launches it (lion_bandwidth.graph_ms: the
gradient's norm as the flag, a clipping budget) and by do_bench as lion_bandwidth.py's older rows; the
outputs compared with the before-kernel's at the same rounds (the share of codes that differ: the
approximate reciprocal flips rare roundings).

    python bench/sessions/lion_pack_20261130.py --commit SHA --out DIR
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
    args = p.parse_args()
    dev = torch.device("cuda")
    before = Launcher(importlib.import_module("qft_ds.ops._lion_before").lion_kernel_3d)
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

    def step_fn(st, mb, use_before, rounds, graph):
        w, ws, mc, msc, ov = st
        kw = dict(lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0, step=7, offset=0,
                  momentum_bits=mb, outlier_idx=o_idx, outlier_val=ov, layout="3d", fused_outliers=True,
                  rand_bits=16, philox_rounds=rounds, **(dict(finite=norm, clip=1.0) if graph else {}))
        kernel = (lambda name: before if name == "lion_kernel_3d" else orig(name)) if use_before else orig

        def run():
            tb._kernel = kernel
            try:
                ops.lion_step(w, ws, 128, mc, msc, 256, g, **kw)
            finally:
                tb._kernel = orig
        return run

    nbytes = {mb: N * (2 + 2 * mb / 8 + 2) + 2 * (N // 128 + N // 256) * 4 for mb in (8, 4)}
    for mb in (8, 4):
        for rounds in (10, 7):
            outs = {}
            for name in ("before", "after"):
                fresh = lambda: [w0.clone(), ws0.clone(), moms[mb][0].clone(), moms[mb][1].clone(), o_val0.clone()]  # noqa: E731
                st = fresh()
                step_fn(st, mb, name == "before", rounds, True)()
                torch.cuda.synchronize()
                outs[name] = st
                t_graph = graph_ms(step_fn(fresh(), mb, name == "before", rounds, True))
                t_bench = do_bench(step_fn(fresh(), mb, name == "before", rounds, False), return_mode="median")
                row = {"momentum_bits": mb, "kernel": name, "philox_rounds": rounds, "ms_graph": t_graph,
                       "frac_of_copy_graph": nbytes[mb] / t_graph / 1e6 / out["copy_gbs"], "ms_do_bench": t_bench,
                       "frac_of_copy_do_bench": nbytes[mb] / t_bench / 1e6 / out["copy_gbs"]}
                if name == "after":
                    b = outs["before"]
                    row["same_bits_as_before"] = all(torch.equal(x_, y_) for x_, y_ in zip(b, st))
                    row["w_codes_differing"] = (b[0] != st[0]).float().mean().item()
                    row["m_codes_differing"] = (b[2] != st[2]).float().mean().item()
                    row["scales_max_rel_diff"] = max(((x_ - y_).abs() / x_.abs().clamp_min(1e-30)).max().item()
                                                     for x_, y_ in ((b[1], st[1]), (b[3], st[3])))
                    row["outliers_max_abs_diff"] = (b[4] - st[4]).abs().max().item()
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    out["copy_gbs_end"] = 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), return_mode="median") / 1e6
    print(f"wrote {common.write_result('lion_pack', out, args.out)}")


if __name__ == "__main__":
    main()
