"""Session A/B (issue 15, the Lion kernel at >= 80% of copy), kept as the record of
bench/results/lion_persist_20261130-0904.json: lion_kernel_3d with programs of several chunks (a loop over
`chunks_per_program` chunks, the outliers' pointers prefetched a chunk ahead, register caps) against the
kernel of cb852f9 (loaded from a copy of its source, ops/_lion_before.py, carried untracked), int8 and int4
momentum with 1% outliers, in one process with the copy. Every variant was slower (bench/NOTES.md) and the
loop kernel was not committed: this script no longer runs against the tree. Every kernel is timed two ways: triton's do_bench as bench/lion_bandwidth.py does (one
lion_step per timing, a fresh finite flag allocated per call), and as training runs it (the gradient's
norm as the flag, a clipping budget: OK_FLOAT and CLIP), 20 back-to-back launches replayed from a CUDA
graph, so that the host's launch gap is not counted. The outputs of every variant are checked equal to
the before-kernel's on the first step.

    python bench/sessions/lion_persist_20261130.py --commit SHA --out DIR
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from qft_ds.ops import get_ops, reference as ref  # noqa: E402
from qft_ds.ops import triton_backend as tb  # noqa: E402
from qft_ds.ops.triton_launch import Launcher  # noqa: E402

N = 4096 * 11008


def graph_ms(fn, reps=20, trials=7):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / reps)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    before = Launcher(__import__("qft_ds.ops._lion_before", fromlist=["x"]).lion_kernel_3d)
    x = torch.randn(2**28, device=dev)
    y = torch.empty_like(x)
    copy = lambda: y.copy_(x)  # noqa: E731
    out = {**common.header(args.commit), "n": N, "copy_gbs_do_bench": 2 * x.numel() * 4 / do_bench(copy) / 1e6,
           "copy_gbs_graph": 2 * x.numel() * 4 / graph_ms(copy, reps=5) / 1e6, "rows": []}
    del x, y
    print(json.dumps({k: out[k] for k in ("copy_gbs_do_bench", "copy_gbs_graph")}), flush=True)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    w0, ws0 = ref.quantize_blockwise(torch.randn(N, device=dev, generator=gen) * 0.02, 128)
    m8 = ref.quantize_blockwise(torch.randn(N, device=dev, generator=gen) * 1e-3, 256)
    m4 = ref.quantize_momentum(torch.randn(N, device=dev, generator=gen) * 1e-3, 256, 1, 0, bits=4)
    g = (torch.randn(N, device=dev, generator=gen) * 1e-2).bfloat16()
    o_idx = torch.randperm(N, device=dev, generator=gen)[: N // 100].sort().values.to(torch.int32)
    w0[o_idx.long()] = 0
    o_val0 = torch.randn(N // 100, device=dev, generator=gen) * 0.05
    norm = torch.tensor(0.5, device=dev)
    ops = get_ops("triton", dev)
    n_chunks = -(-N // 2048)

    def state(mb):
        mc, msc = m8 if mb == 8 else m4
        return [w0.clone(), ws0.clone(), mc.clone(), msc.clone(), o_val0.clone()]

    def step_fn(st, mb, variant, finite, clip):
        w, ws, mc, msc, ov = st
        kw = dict(lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0, step=7, offset=0,
                  momentum_bits=mb, outlier_idx=o_idx, outlier_val=ov, finite=finite, clip=clip, layout="3d",
                  fused_outliers=True, rand_bits=16)
        if variant.get("before"):
            orig = tb._kernel

            def patched(name):
                if name != "lion_kernel_3d":
                    return orig(name)
                return lambda grid, *a, **k: before(grid, *a[:-2], **{kk: v for kk, v in k.items() if kk != "maxnreg"})
            return lambda: (setattr(tb, "_kernel", patched),
                            ops.lion_step(w, ws, 128, mc, msc, 256, g, **kw, chunks_per_program=1),
                            setattr(tb, "_kernel", orig))
        per = variant.get("per")
        if per is None and variant.get("per_sm"):
            per = -(-n_chunks // (sms * variant["per_sm"]))
        knobs = dict(chunks_per_program=per, maxnreg=variant.get("maxnreg"), philox_rounds=variant.get("rounds", 10))
        return lambda: ops.lion_step(w, ws, 128, mc, msc, 256, g, **kw, **knobs)

    variants = [dict(name="before", before=True)]
    for per_sm in (8, 6, 5):
        variants.append(dict(name=f"persist_sm{per_sm}", per_sm=per_sm))
    for reg in (64, 72, 80):
        for per_sm in (8, 7) if reg != 64 else (8,):
            variants.append(dict(name=f"persist_sm{per_sm}_r{reg}", per_sm=per_sm, maxnreg=reg))
    variants.append(dict(name="loop_one_chunk", per=1))
    variants.append(dict(name="persist_sm8_r72_rounds7", per_sm=8, maxnreg=72, rounds=7))
    if args.quick:
        variants = variants[:2]
    nbytes = {mb: N * (2 + 2 * mb / 8 + 2) + 2 * (N // 128 + N // 256) * 4 for mb in (8, 4)}
    for mb in (8, 4):
        ref_out = None
        for v in variants:
            st = state(mb)
            step_fn(st, mb, v, norm, 1.0)()
            torch.cuda.synchronize()
            same = None
            if ref_out is None:
                ref_out = [t.clone() for t in st]
            elif "rounds" not in v:
                same = all(torch.equal(a, b) for a, b in zip(ref_out, st))
            st = state(mb)
            t_graph = graph_ms(step_fn(st, mb, v, norm, 1.0))
            st = state(mb)
            t_bench = do_bench(step_fn(st, mb, v, None, 0.0), return_mode="median")
            row = {"momentum_bits": mb, **{k: v[k] for k in v if k != "before"}, "same_bits_as_before": same,
                   "ms_graph": t_graph, "gbs_graph": nbytes[mb] / t_graph / 1e6, "ms_do_bench": t_bench,
                   "gbs_do_bench": nbytes[mb] / t_bench / 1e6}
            row["frac_graph"] = row["gbs_graph"] / out["copy_gbs_graph"]
            row["frac_do_bench"] = row["gbs_do_bench"] / out["copy_gbs_do_bench"]
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    x = torch.randn(2**28, device=dev)
    y = torch.empty_like(x)
    out["copy_gbs_graph_end"] = 2 * x.numel() * 4 / graph_ms(lambda: y.copy_(x), reps=5) / 1e6
    out["copy_gbs_do_bench_end"] = 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x)) / 1e6
    path = common.write_result("lion_persist", out, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
