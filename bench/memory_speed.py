"""Memory and speed of QFT against the standard recipes, one process, methods one after the other.

Random-init LLaMA shapes, bf16 compute, gradient checkpointing. For each method: peak GPU memory of
training (torch.cuda.max_memory_allocated, reset after setup; the setup peak is recorded apart),
tokens/s from the median of timed steps after warm-up, and model-state bytes per parameter. Also the
copy bandwidth and the int8 Lion kernel's achieved bandwidth, measured in the same run (lion_bandwidth.py).

    python bench/memory_speed.py --commit $(git rev-parse HEAD)                 # 1.1B and 7B shapes
    python bench/memory_speed.py --shapes 1.1b --methods qft bf16_adamw         # a subset

Methods: qft (through DeepSpeed, as users run it; Triton kernels where they run), qft_unfused (the same
with `qft.fuse_projections: false` and `qft.fuse_norms: false`: one weight per projection and HF's own
RMSNorm, the model as before those keys), qft_torch (the same
with the PyTorch reference ops), fp32_adamw (fp32 master weights, fused torch AdamW), bf16_adamw and
bf16_lion (pure bf16 weights), ds_fusedadam (DeepSpeed FusedAdam at ZeRO-0 with its bf16 mode); qft_2pass is
qft with QFT_DS_LION_LAYOUT=2pass (the two-pass Lion kernel and torch outlier ops, the default before the
one-tile kernel was measured; results before commit 6870043 call these qft and qft_3d instead); qft_sync is
qft with one more host read of the loss between forward and backward (it measured that sync's cost while
the engine checked the loss on the device, commits a8c2087-e5feaf7; the engine's own check syncs again
since, bench/NOTES.md); qft_jit is qft with every Triton
kernel launched through Triton's JIT (QFT_DS_TRITON_LAUNCH=jit) instead of directly (ops/triton_launch.py);
qft_nonreentrant is qft with `qft.checkpoint_reentrant: false` (torch's non-reentrant checkpoint, HF's default,
which the baselines use); fp32_adamw_reentrant is fp32_adamw with the reentrant checkpoint that qft uses;
qft_noclip is qft without gradient clipping and qft_two_pass qft with `qft.clip_mode: two_pass` (a norm-only
backward every step): with qft (per-tensor clipping budgets, a norm pass at step 0 only) they price clipping.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lion_bandwidth import bandwidths  # noqa: E402
from fidelity import FP32Lion  # noqa: E402

SHAPES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, batch=8, seq=512),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, batch=1, seq=512),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, batch=2, seq=64),
}
METHODS = ["qft", "qft_noclip", "qft_two_pass", "qft_unfused", "qft_2pass", "qft_sync", "qft_jit", "qft_nonreentrant", "qft_torch", "fp32_adamw", "fp32_adamw_reentrant", "bf16_adamw", "bf16_lion", "ds_fusedadam"]


def llama_config(shape):
    from transformers import LlamaConfig
    dims = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    return LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False)


def _checkpointed(model, reentrant):
    from qft_ds.nn.qmodules import enable_checkpointing
    enable_checkpointing(model, reentrant)
    model.config.use_cache = False
    return model


def build(shape, dtype, device, reentrant=False):
    """A random-init LLaMA of `shape`, checkpointed as HF does by default (non-reentrant) unless `reentrant`."""
    from transformers import LlamaForCausalLM
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape)).to(dtype)
    return _checkpointed(model, reentrant)


def build_quantized(shape, device, fuse=True):
    """The same shape for qft: each weight is drawn in bf16 on the device and quantized at once, so no
    full-precision copy of more than one layer exists (a 70B shape in bf16 fits neither GPU nor host memory)."""
    from qft_ds.nn.streaming import build_random
    model, _ = build_random(llama_config(shape), device, dtype=torch.bfloat16, compute_dtype=torch.bfloat16,
                            fuse_projections=fuse)
    return _checkpointed(model, False)


def qft_config(backend, batch, fuse=True, reentrant=True, clip=1.0, clip_mode="budget"):
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
            "bf16": {"enabled": True}, "steps_per_print": 10**9,
            "optimizer": {"type": "QFTLion", "params": {"lr": 1e-5, "weight_decay": 0.1}},
            "qft": {"backend": backend, "gradient_checkpointing": True, "fuse_projections": fuse,
                    "fuse_norms": fuse, "checkpoint_reentrant": reentrant, "clip_mode": clip_mode}}


def method_env(method: str) -> None:
    """Set the kernel switches a method variant stands for (each block of steps sets its own)."""
    from qft_ds.ops import triton_launch
    os.environ["QFT_DS_LION_LAYOUT"] = "2pass" if method == "qft_2pass" else "auto"
    triton_launch.MODE = "jit" if method == "qft_jit" else "direct"


def clear_env() -> None:
    from qft_ds.ops import triton_launch
    os.environ.pop("QFT_DS_LION_LAYOUT", None)
    triton_launch.MODE = "direct"


def setup(method, shape, dev):
    """(step function, bytes/param of model state, number of params)."""
    import qft_ds
    batch = SHAPES[shape]["batch"]
    if method.startswith("qft"):
        fuse = method != "qft_unfused"
        model = build_quantized(shape, dev, fuse)
        engine, opt, _, _ = qft_ds.initialize(model=model, config=qft_config(
            "torch" if method == "qft_torch" else "auto", batch, fuse, reentrant=method != "qft_nonreentrant",
            clip=0.0 if method == "qft_noclip" else 1.0, clip_mode="two_pass" if method == "qft_two_pass" else "budget"))

        sync = method == "qft_sync"

        def step(x):
            loss = engine(input_ids=x, labels=x).loss
            if sync:
                bool(torch.isfinite(loss).all())
            engine.backward(loss)
            engine.step()
        st = opt.state_nbytes()
        n = st["quantized_params"] + st["float_params"]
        return step, (st["quantized_bytes"] + st["float_bytes"]) / n, n
    if method == "ds_fusedadam":
        import deepspeed
        model = build(shape, torch.bfloat16, dev)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
            "train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-5, "weight_decay": 0.01}}, "steps_per_print": 10**9})
        n = sum(p.numel() for p in model.parameters())

        def step(x):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        return step, 2 + 4 + 8, n  # bf16 weights + fp32 master + fp32 Adam m, v (grads not counted)
    dtype = torch.float32 if method.startswith("fp32_adamw") else torch.bfloat16
    model = build(shape, dtype, dev, reentrant=method.endswith("_reentrant"))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if "adamw" in method:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)
        bpp = 3 * dtype.itemsize
    else:
        opt = FP32Lion(params, lr=1e-5, weight_decay=0.1)
        bpp = 2 * dtype.itemsize

    def step(x):
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.float32):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, bpp, n


def measure(method, shape, args, dev):
    row = {"method": method, "model": shape, "batch": SHAPES[shape]["batch"], "seq": SHAPES[shape]["seq"],
           "peak_gib": None, "setup_peak_gib": None, "tok_s": None, "state_bytes_per_param": None, "oom": False}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    method_env(method)
    try:
        step, bpp, n = setup(method, shape, dev)
        row.update(state_bytes_per_param=round(bpp, 4), params=n)
        row["setup_peak_gib"] = common.peak_gib()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(0)
        times = []
        for i in range(args.warmup + args.iters):
            x = torch.randint(0, SHAPES[shape]["vocab_size"], (row["batch"], row["seq"]), generator=g).to(dev)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(x)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        row["peak_gib"] = common.peak_gib()
        row["step_s"] = statistics.median(times)
        if method in args.profile:
            profile(step, x, f"{method}_{shape}", args.out)
        if method in args.cprofile:
            cprofile(step, x, f"{method}_{shape}", args.out)
        row["tok_s"] = row["batch"] * row["seq"] / row["step_s"]
    except torch.OutOfMemoryError:
        row["oom"] = True
        row["peak_gib"] = common.peak_gib()
    except Exception as e:  # record, keep going: one broken baseline must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        clear_env()
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    print(f"  {shape:>5} {method:>13}: peak {row['peak_gib'] if row['peak_gib'] is None else round(row['peak_gib'], 2)} GiB"
          f"  tok/s {row['tok_s'] and round(row['tok_s'])}  oom={row['oom']} {row.get('error', '')}", flush=True)
    return row


def profile(step, x, name, out_dir):
    """Where the time goes: top CUDA kernels and CPU ops over 2 steps, written next to the JSON."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(x)
        torch.cuda.synchronize()
    avg = prof.key_averages()
    n_kernels = sum(e.count for e in avg if e.device_type == torch.autograd.DeviceType.CUDA)
    # by device time (what the GPU does) and by own host time (what keeps a host-bound step busy)
    text = (f"{name}: {n_kernels / 2:.0f} CUDA kernel launches per step\n"
            f"{avg.table(sort_by='cuda_time_total', row_limit=30, max_name_column_width=60)}\n"
            f"{avg.table(sort_by='self_cpu_time_total', row_limit=40, max_name_column_width=60)}")
    path = Path(out_dir or common.RESULTS) / f"profile_{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text[:6000], flush=True)


def cprofile(step, x, name, out_dir):
    """Where the host time goes (Python, launches, syncs) over 2 steps: cProfile, top 40 by own time and top
    50 by cumulative time (tensor indexing runs through C slots that cProfile does not see as calls: its
    cost shows in the caller's own time). Backward runs on the calling thread here: cProfile sees only it."""
    import cProfile
    import io
    import pstats
    torch.autograd.set_multithreading_enabled(False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        step(x)
    torch.cuda.synchronize()
    prof.disable()
    torch.autograd.set_multithreading_enabled(True)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(60)
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(50)
    path = Path(out_dir or common.RESULTS) / f"cprofile_{name}.txt"
    path.write_text(buf.getvalue())
    print(buf.getvalue()[:5000], flush=True)


def interleaved(shape, methods, args, dev) -> dict:
    """Speed with every method's model resident at once, timed in alternating blocks of `iters` steps
    (the method order rotates each round). The host-bound steps swing by 30% between runs of this
    machine (other tenants' CPU load); a ratio of two methods is only fair when both saw the same
    moments, so the ratio is taken per round and its median reported."""
    steps = {}
    for m in methods:
        method_env(m)
        try:
            steps[m] = setup(m, shape, dev)[0]
        except torch.OutOfMemoryError:
            print(f"  interleaved: {m} does not fit next to the others; left out", flush=True)
        finally:
            clear_env()
    g = torch.Generator().manual_seed(1)
    batch, seq = SHAPES[shape]["batch"], SHAPES[shape]["seq"]
    x = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g).to(dev)
    names = list(steps)
    tok_s = {m: [] for m in names}
    step_s = {m: [] for m in names}  # every timed step, per round: does a method switch cost the next steps?
    for r in range(args.rounds + 1):  # round 0: warm-up, not recorded
        for m in names[r % len(names):] + names[: r % len(names)]:
            method_env(m)
            times = []
            for _ in range(args.iters if r else args.warmup):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                steps[m](x)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            if r:
                tok_s[m].append(batch * seq / statistics.median(times))
                step_s[m].append([round(t, 5) for t in times])
        clear_env()
    out = {"model": shape, "rounds": args.rounds, "steps_per_block": args.iters, "tok_s_per_round": tok_s,
           "tok_s_median": {m: statistics.median(v) for m, v in tok_s.items()}, "step_s_per_round": step_s}
    if "fp32_adamw" in tok_s:
        base = tok_s["fp32_adamw"]
        out["ratio_to_fp32_adamw"] = {m: {"per_round": [a / b for a, b in zip(v, base)],
                                          "median": statistics.median(a / b for a, b in zip(v, base))}
                                      for m, v in tok_s.items() if m != "fp32_adamw"}
    for m in names:
        ratio = out.get("ratio_to_fp32_adamw", {}).get(m, {}).get("median")
        print(f"  interleaved {shape} {m:>13}: median {out['tok_s_median'][m]:.0f} tok/s"
              + (f", {ratio:.3f}x fp32_adamw (median of per-round ratios)" if ratio else ""), flush=True)
    steps = None
    gc.collect()
    torch.cuda.empty_cache()
    return out


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False)
    for j, shape in enumerate(shapes):
        rows = [r for r in result["rows"] if r["model"] == shape]
        names = [r["method"] for r in rows]
        for i, (key, label) in enumerate((("peak_gib", "peak GiB"), ("tok_s", "tokens/s"))):
            ax = axes[i][j]
            vals = [0 if r["oom"] or r.get(key) is None else r[key] for r in rows]
            bars = ax.bar(names, vals, color=["C0" if n.startswith("qft") else "C7" for n in names])
            for b, r in zip(bars, rows):
                if r["oom"] or r.get("error"):
                    ax.text(b.get_x() + b.get_width() / 2, 0, "OOM" if r["oom"] else "error", ha="center",
                            va="bottom", color="red")
            ax.set_ylabel(label)
            ax.set_title(f"{shape} (bsz {rows[0]['batch']}x{rows[0]['seq']})")
            ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"qft_ds memory and speed ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if result.get("interleaved"):
        plot_interleaved(result, path.with_name(path.stem + "_interleaved.png"))


def plot_interleaved(result, path):
    """Per-round tok/s of the interleaved timing (the fair comparison on a noisy host) and the median of
    the per-round ratios to fp32 AdamW."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["interleaved"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for i, (m, vals) in enumerate(run["tok_s_per_round"].items()):
            ax.plot(range(1, len(vals) + 1), vals, marker="o", color=f"C{i}",
                    label=m + (f" ({run['ratio_to_fp32_adamw'][m]['median']:.2f}x)"
                               if m in run.get("ratio_to_fp32_adamw", {}) else ""))
        ax.set_xlabel("round (methods alternate within a round)")
        ax.set_xticks(range(1, run["rounds"] + 1))
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{run['model']}: {run['steps_per_block']} steps per block")
        ax.legend(fontsize=8)
    fig.suptitle(f"interleaved speed; (median per-round ratio to fp32 AdamW)\n{result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1.1b", "7b"], choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--profile", nargs="*", default=[], choices=METHODS, help="profile these methods (2 steps)")
    p.add_argument("--cprofile", nargs="*", default=[], choices=METHODS, help="cProfile these methods (2 steps)")
    p.add_argument("--skip-bandwidth", action="store_true")
    p.add_argument("--rounds", type=int, default=0,
                   help="then time the methods of each shape interleaved, all resident, for this many rounds")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("memory_speed.py measures GPU memory: it needs CUDA")
    common.single_process_env()
    dev = "cuda"
    result = common.header(args.commit)
    if not args.skip_bandwidth:
        result.update(bandwidths(dev))
        print(f"copy {result['copy_gbs']:.0f} GB/s  lion triton {result['lion_triton_gbs']:.0f} GB/s "
              f"({result['lion_triton_ms']:.3f} ms)  lion torch {result['lion_torch_gbs']:.0f} GB/s", flush=True)
    result["rows"] = []
    for s in args.shapes:
        for m in args.methods:
            result["rows"].append(measure(m, s, args, dev))
            common.write_partial("memory_speed", result, args.out)
        if args.rounds:
            fits = [r["method"] for r in result["rows"] if r["model"] == s and r["tok_s"] is not None]
            result.setdefault("interleaved", []).append(interleaved(s, fits, args, dev))
            common.write_partial("memory_speed", result, args.out)
    path = common.write_result("memory_speed", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path}")
    print(f"{'model':>5} {'method':>13} {'peak GiB':>9} {'tok/s':>8} {'B/param':>8}")
    for r in result["rows"]:
        peak = "OOM" if r["oom"] else (f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "err")
        print(f"{r['model']:>5} {r['method']:>13} {peak:>9} {r['tok_s'] or 0:8.0f} {r['state_bytes_per_param'] or 0:8.3f}")


if __name__ == "__main__":
    main()
