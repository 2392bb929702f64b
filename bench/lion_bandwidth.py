"""Copy bandwidth and the int8 Lion kernel's achieved bandwidth on one LLaMA-7B MLP weight, measured in
the same process, over a sweep of launch configurations, the int4-momentum kernel's (momentum_bits 4)
at the default configuration, and both with 1% outliers over random bits per element and launch
configurations (BITS_SWEEP). `memory_speed.py` records it with every run (`--skip-bandwidth` leaves it
out)."""
from __future__ import annotations

import torch


# Launch configurations timed by the sweep. `philox_rounds` below 10 is another random stream (Random123
# finds no statistical flaw from 7 rounds; 10 is its safety margin). (A bit-trick int8/uniform -> float
# variant with fewer conversions measured slower, 0.153 against 0.139 ms on the H100: the kernel is
# issue-bound, not conversion-bound, so it was removed; bench/kernel_sass.py counts instructions.)
SWEEP = [dict(layout="3d", chunk=2048, num_warps=4, philox_rounds=10),
         dict(layout="2pass", chunk=None, num_warps=4, philox_rounds=10),
         dict(layout="3d", chunk=1024, num_warps=4, philox_rounds=10),
         dict(layout="3d", chunk=4096, num_warps=8, philox_rounds=10),
         dict(layout="3d", chunk=2048, num_warps=8, philox_rounds=10),
         dict(layout="3d", chunk=2048, num_warps=4, philox_rounds=7),
         dict(layout="3d", chunk=2048, num_warps=4, philox_rounds=4)]

# Random bits per element (ops/triton_rng.py: 16, the default, halves 32's Philox work at the same 2^-16
# rounding resolution; 8 quarters it, rounding probabilities quantized to 1/256), for int8 and int4 momentum
# with 1% outliers fused (the training path; issue 15's >= 80% of copy target), and 7 Philox rounds with 16
# bits. Larger tiles (32 elements per thread) measured slower at every setting (lion_sweep_20261130-0558.json)
# and are left out.
BITS_SWEEP = [dict(momentum_bits=mb, rand_bits=rb, chunk=2048, num_warps=4, philox_rounds=rounds)
              for mb in (8, 4) for rb, rounds in ((16, 10), (32, 10), (8, 10), (16, 7))]

# The int4 kernel's packed momentum as whole byte tiles (m4_vec: one 8-byte load and store per thread at
# 16 elements per thread, where the byte-wise kernel gathers single bytes and packs through shared memory;
# the same bits, tests/ops/test_lion_m4_vec.py) against the byte-wise one, paired, 1% outliers fused.
M4_VEC_SWEEP = [dict(momentum_bits=4, rand_bits=16, chunk=2048, num_warps=4, m4_vec=vec) for vec in (False, True)]

# The outlier loops' first block outside the loops, its indices kept across the barrier for the zeroing
# (keep_outliers: no second load of the indices before the zeroing stores; the same bits,
# tests/ops/test_lion_keep_outliers.py) against without, paired: int8, and int4 with m4_vec.
KEEP_OUTLIERS_SWEEP = [dict(momentum_bits=mb, rand_bits=16, chunk=2048, num_warps=4, m4_vec=vec, keep_outliers=keep)
                       for mb, vec in ((8, False), (4, True)) for keep in (False, True)]


def graph_ms(fn, launches: int = 20, trials: int = 7) -> float:
    """Median time of one call of `fn` (a kernel launch), `launches` of them replayed back to back from a
    CUDA graph: the kernel's own time, without the host's launch gap between calls (which do_bench counts
    when the host takes longer than the kernel) or an allocation per call."""
    import statistics
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return statistics.median(times)


def copy_gbs(dev, numel: int = 2**28) -> float:
    """The copy's bandwidth (read + write, GB/s) of `numel` fp32 values, by do_bench: the yardstick."""
    from triton.testing import do_bench
    x = torch.randn(numel, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), return_mode="median") / 1e6


def lion_bytes(n: int, momentum_bits: int = 8, grad_bytes: int = 2) -> float:
    """Bytes one Lion step moves over an n-element weight: int8 weight and int8/int4 momentum read and
    written, the gradient read, the fp32 group (128) and block (256) scales read and written."""
    return n * (2 + 2 * momentum_bits / 8 + grad_bytes) + 2 * (n // 128 + n // 256) * 4


def weight_inputs(dev, n: int, generator=None) -> dict:
    """A random LLaMA-like weight's Lion inputs: int8 weight (group 128), int8 and packed int4 momentum
    (block 256), a bf16 gradient, 1% outliers (sorted int32 indices) and their fp32 values."""
    from qft_ds.ops import reference as ref
    kw = dict(device=dev, generator=generator)
    w, ws = ref.quantize_blockwise(torch.randn(n, **kw) * 0.02, 128)
    m8 = ref.quantize_blockwise(torch.randn(n, **kw) * 1e-3, 256)
    m4 = ref.quantize_momentum(torch.randn(n, **kw) * 1e-3, 256, 1, 0, bits=4)  # packed int4, scales
    g = (torch.randn(n, **kw) * 1e-2).bfloat16()
    o_idx = torch.randperm(n, **kw)[: n // 100].sort().values.to(torch.int32)
    return {"w": w, "ws": ws, "m8": m8, "m4": m4, "g": g, "o_idx": o_idx, "o_val": torch.randn(n // 100, **kw) * 0.05}


def bandwidths(dev, n=4096 * 11008, copy_numel=2**28, bits_sweep=False):
    """Copy bandwidth (read + write) and the int8 Lion kernel's, on a 4096 x 11008 weight.

    Bytes counted per param: int8 w and m read + written (4; int4 momentum: 3), the gradient read (2 in
    bf16, as training passes it; 4 in fp32), plus the fp32 group/block scales read + written. The triton
    kernel is also run over a few launch configurations (`sweep`); `lion_kernel_gbs` is the default one,
    used in training; `lion_m4_*` the same with int4 momentum. `bits_sweep` (the standalone run's; 14 more
    kernels to compile and time, left out of memory_speed.py's runs) times BITS_SWEEP: `lion_bits_sweep`,
    and `lion_bits_best`, the fastest configuration per (momentum_bits, rand_bits); then M4_VEC_SWEEP,
    today's int4 kernel and its byte-tile variant paired (`lion_m4_vec_sweep`), and KEEP_OUTLIERS_SWEEP
    (`lion_keep_outliers_sweep`). The rows of these three sweeps are timed twice: by do_bench (`ms`, `gbs`,
    `frac_of_copy`: one call per timing, the host's launch gap and a flag allocation counted) and back to
    back as the fused flow launches the kernel (`ms_graph`, `gbs_graph`, `frac_of_copy_graph`: graph_ms).
    """
    from qft_ds.ops import get_ops
    from triton.testing import do_bench
    copy = copy_gbs(dev, copy_numel)
    out = {"copy_gbs": copy, "lion_sweep": []}
    inp = weight_inputs(dev, n)
    w, ws, (m, ms), m4, o_idx, o_val = inp["w"], inp["ws"], inp["m8"], inp["m4"], inp["o_idx"], inp["o_val"]
    grads = {"bf16": inp["g"], "fp32": inp["g"].float()}
    step = [0]

    norm = torch.full((), 0.5, device=dev)  # the fused flow's finite flag: the gradient's norm

    def timed(ops, g, momentum_bits=8, graph=False, **knobs):
        """(ms, GB/s) of one lion_step: by do_bench, a fresh step key per call; `graph`: by graph_ms, as the
        fused flow launches it (the gradient's norm as the finite flag, a clipping budget: OK_FLOAT, CLIP)."""
        mc, mscales = (m, ms) if momentum_bits == 8 else m4
        flow = dict(finite=norm, clip=1.0) if graph else {}

        def run():
            step[0] += 1
            ops.lion_step(w, ws, 128, mc, mscales, 256, g, lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1,
                          rounding="sr", seed=0, step=step[0], offset=0, momentum_bits=momentum_bits, **flow,
                          **knobs)
        ms_ = graph_ms(run) if graph else do_bench(run, return_mode="median")
        return ms_, lion_bytes(n, momentum_bits, g.element_size()) / ms_ / 1e6

    triton_ops, torch_ops = get_ops("triton", dev), get_ops("torch", dev)
    for gname, g in grads.items():
        for knobs in SWEEP if gname == "bf16" else SWEEP[:3]:
            ms_, gbs = timed(triton_ops, g, **knobs)
            out["lion_sweep"].append({"grad": gname, **knobs, "ms": ms_, "gbs": gbs})
            print(f"  lion triton grad={gname} {knobs}: {ms_:.3f} ms {gbs:.0f} GB/s", flush=True)
    # With 1% outliers, as in training: the torch ops around the kernel against the fused kernel (the
    # host launch cost is what matters in training; this times the device side only).
    for knobs in (dict(layout="2pass"), dict(layout="3d", fused_outliers=True)):
        ms_, gbs = timed(triton_ops, grads["bf16"], outlier_idx=o_idx, outlier_val=o_val, **knobs)
        out["lion_sweep"].append({"grad": "bf16", "outliers": 0.01, **knobs, "ms": ms_, "gbs": gbs})
        print(f"  lion triton with 1% outliers {knobs}: {ms_:.3f} ms", flush=True)
    out["lion_triton_ms"], out["lion_triton_gbs"] = timed(triton_ops, grads["bf16"])
    # int4 momentum (issue 15: >= 80% of copy bandwidth too), alone and with 1% outliers fused
    out["lion_m4_ms"], out["lion_m4_gbs"] = timed(triton_ops, grads["bf16"], momentum_bits=4)
    out["lion_m4_outliers_ms"], out["lion_m4_outliers_gbs"] = timed(
        triton_ops, grads["bf16"], momentum_bits=4, outlier_idx=o_idx, outlier_val=o_val)
    out["lion_m4_frac_of_copy"] = out["lion_m4_gbs"] / copy
    print(f"  lion triton int4 momentum: {out['lion_m4_ms']:.3f} ms {out['lion_m4_gbs']:.0f} GB/s; with 1% "
          f"outliers {out['lion_m4_outliers_ms']:.3f} ms", flush=True)
    def outlier_sweep(sweep):  # 1% outliers fused, as in training
        rows = []
        for knobs in sweep if bits_sweep else []:
            (ms_, gbs), (ms_g, gbs_g) = (timed(triton_ops, grads["bf16"], graph=graph, layout="3d",
                                               fused_outliers=True, outlier_idx=o_idx, outlier_val=o_val, **knobs)
                                         for graph in (False, True))
            rows.append({"grad": "bf16", "outliers": 0.01, **knobs, "ms": ms_, "gbs": gbs,
                         "frac_of_copy": gbs / copy, "ms_graph": ms_g, "gbs_graph": gbs_g,
                         "frac_of_copy_graph": gbs_g / copy})
            print(f"  lion triton with 1% outliers {knobs}: {ms_:.3f} ms {gbs / copy:.0%} of copy; "
                  f"back to back {ms_g:.3f} ms {gbs_g / copy:.0%}", flush=True)
        return rows

    out["lion_bits_sweep"] = outlier_sweep(BITS_SWEEP)
    if bits_sweep:
        out["lion_bits_best"] = best_per_bits(out["lion_bits_sweep"])
    out["lion_m4_vec_sweep"] = outlier_sweep(M4_VEC_SWEEP)
    out["lion_keep_outliers_sweep"] = outlier_sweep(KEEP_OUTLIERS_SWEEP)
    out["lion_torch_ms"], out["lion_torch_gbs"] = timed(torch_ops, grads["bf16"])
    out["lion_kernel_gbs"] = out["lion_triton_gbs"]
    out["lion_kernel_frac_of_copy"] = out["lion_triton_gbs"] / copy
    out["copy_gbs_end"] = copy_gbs(dev, copy_numel)  # again at the end: the clocks drift over a sweep
    out["lion_bytes_per_param"] = round(4 + 2 + 2 * (1 / 128 + 1 / 256) * 4, 3)
    out["lion_m4_bytes_per_param"] = round(3 + 2 + 2 * (1 / 128 + 1 / 256) * 4, 3)
    return out


def best_per_bits(rows):
    """The fastest launch configuration for each (momentum_bits, rand_bits, philox_rounds) of the bits sweep."""
    best = {}
    for row in rows:
        rounds = row.get("philox_rounds", 10)
        key = f"m{row['momentum_bits']}_bits{row['rand_bits']}" + (f"_rounds{rounds}" if rounds != 10 else "")
        if key not in best or row["gbs"] > best[key]["gbs"]:
            best[key] = row
    return best


def plot(result: dict, path, ceiling: float | None = None) -> list[tuple[str, float]]:
    """A bar per row of the bits sweep (1% outliers fused): its share of the copy bandwidth (timed back to back,
    graph_ms, where the result has it; do_bench in older results), the 80% target
    and (`ceiling`, a share) what the kernel's streams alone reach drawn as lines. Returns the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = []
    rows = result["lion_bits_sweep"]
    key = "gbs_graph" if all("gbs_graph" in row for row in rows) else "gbs"  # results before graph timing: do_bench
    for row in rows:
        rounds = row.get("philox_rounds", 10)
        label = f"int{row['momentum_bits']}\n{row['rand_bits']} bits" + (f"\n{rounds} rounds" if rounds != 10 else "")
        bars.append((label, row[key] / result["copy_gbs"]))
    fig, ax = plt.subplots(figsize=(1.1 * len(bars) + 2, 4))
    ax.bar(range(len(bars)), [100 * v for _, v in bars],
           color=["tab:blue" if "int8" in label else "tab:orange" for label, _ in bars])
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.axhline(80, color="k", ls="--", lw=1, label="target: 80% of copy")
    if ceiling is not None:
        ax.axhline(100 * ceiling, color="tab:green", ls=":", lw=1.5, label="the streams alone")
    ax.set_ylabel("% of copy bandwidth (1% outliers" + (", back to back)" if key == "gbs_graph" else ")"))
    ax.set_ylim(0, 115)  # room above the lines for the legend
    ax.set_title(f"Lion kernel, {result.get('device', '?')}, {result.get('commit', '?')}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bars


def main(argv=None):
    """Standalone: `python bench/lion_bandwidth.py --commit SHA` writes bench/results/lion_sweep_*.json and a
    PNG beside it, the bits sweep included; `--plot RESULT.json [--ceiling C.json]` redraws the PNG of a
    result (C: bench/sessions/lion_ceiling_20261130.py's output)."""
    import argparse
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default=None)
    p.add_argument("--plot", metavar="RESULT.json", help="draw the PNG of a result instead of running")
    p.add_argument("--ceiling", metavar="C.json", help="with --plot: the streams-only ceiling's result")
    args = p.parse_args(argv)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        if "lion_bits_sweep" not in result:
            raise SystemExit(f"{args.plot}: no 'lion_bits_sweep': not a lion_bandwidth.py result")
        ceiling = json.loads(Path(args.ceiling).read_text())["frac_of_copy"] if args.ceiling else None
        out = Path(args.plot).with_suffix(".png")
        plot(result, out, ceiling)
        print(f"wrote {out}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("lion_bandwidth.py times the Triton kernel: no CUDA device here")
    path = common.write_result("lion_sweep", {**common.header(args.commit),
                                              **bandwidths(torch.device("cuda"), bits_sweep=True)})
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"wrote {path} and its PNG")


if __name__ == "__main__":
    main()
