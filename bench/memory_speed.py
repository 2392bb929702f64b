"""Memory and speed of QFT against the standard recipes, one process, methods one after the other.

Random-init LLaMA shapes (bench/shapes.py: 1.1b, 7b, llama3-8b, 13b, 70b and a CPU-sized tiny), bf16 compute,
gradient checkpointing. For each method: peak GPU memory of training (torch.cuda.max_memory_allocated, and
max_memory_reserved beside it, reset after setup; the setup's own peaks and seconds are recorded apart),
tokens/s from the median of timed steps after warm-up, and model-state bytes per parameter. A method that
runs out of memory is recorded with "status": "oom" and the error's first line, its memory is freed and the
next method runs. Also the copy bandwidth and the int8 Lion kernel's achieved bandwidth, measured in the same
run (lion_bandwidth.py). Writes the JSON, a bar plot per shape and <stem>_size.png, peak memory against
model size with the card sizes 12, 16, 24, 80 and 141 GB drawn (bench/memory_plot.py).

    python bench/memory_speed.py --commit $(git rev-parse HEAD)                 # 1.1B and 7B shapes
    python bench/memory_speed.py --shapes 1.1b --methods qft bf16_adamw         # a subset
    python bench/memory_speed.py --shapes llama3-8b 13b --methods qft qft_m4_chunked bf16_adamw fp32_adamw
    python bench/memory_speed.py --shapes 70b --methods qft_m4_chunked --iters 3 --skip-bandwidth
    python bench/memory_speed.py --shapes 7b --batch 8 --seq 512                # another batch x seq
    python bench/memory_speed.py --plot A.json B.json --out bench/results       # one size plot of several runs
    python bench/memory_speed.py --shapes tiny --skip-bandwidth --methods qft   # CPU: the script runs; no memory figures

Methods: qft (through DeepSpeed, as users run it; Triton kernels where they run), qft_m4 (`qft.momentum_bits:
4`, int4 Lion momentum), qft_chunked (`qft.chunked_loss`: the loss and the LM head's logits --chunk tokens at a
time), qft_m4_chunked (both), qft_m4_chunked_offload (qft_m4_chunked with `"activation_checkpointing":
{"cpu_checkpointing": true}`: the checkpointed layers' inputs in host memory), qft_m4_bytewise_chunked
(qft_m4_chunked with QFT_DS_LION_M4_VEC=0: the int4 kernel's byte-wise momentum, the default before
2026-11-30; the same bits), qft_unfused (the same
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
from fidelity import FP32Lion  # noqa: E402
from memory_plot import merge, plot_all, plot_size  # noqa: E402
from step_profile import cprofile, profile  # noqa: E402
from shapes import SHAPES, batch_seq, build, build_quantized, shape_sizes  # noqa: E402

# qft's variants: the qft_config arguments each changes ("chunked": qft.chunked_loss = --chunk)
QFT_VARIANTS = {
    "qft": {}, "qft_m4": {"momentum_bits": 4}, "qft_chunked": {"chunked": True},
    "qft_m4_chunked": {"momentum_bits": 4, "chunked": True},
    "qft_m4_chunked_offload": {"momentum_bits": 4, "chunked": True, "cpu_checkpointing": True},
    "qft_m4_bytewise_chunked": {"momentum_bits": 4, "chunked": True}, "qft_noclip": {"clip": 0.0},
    "qft_two_pass": {"clip_mode": "two_pass"}, "qft_unfused": {"fuse": False}, "qft_2pass": {}, "qft_sync": {},
    "qft_jit": {}, "qft_nonreentrant": {"reentrant": False}, "qft_torch": {"backend": "torch"},
}
METHODS = [*QFT_VARIANTS, "fp32_adamw", "fp32_adamw_reentrant", "bf16_adamw", "bf16_lion", "ds_fusedadam"]
T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the seconds since the run started (building a 70B shape is the slow part)."""
    print(f"[{time.perf_counter() - T0:8.1f} s] {msg}", flush=True)


def qft_config(batch, backend="auto", fuse=True, reentrant=True, clip=1.0, clip_mode="budget", momentum_bits=8,
               chunked_loss=0, cpu_checkpointing=False):
    offload = {"activation_checkpointing": {"cpu_checkpointing": True}} if cpu_checkpointing else {}
    return {**offload, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": clip, "bf16": {"enabled": True}, "steps_per_print": 10**9,
            "optimizer": {"type": "QFTLion", "params": {"lr": 1e-5, "weight_decay": 0.1}},
            "qft": {"backend": backend, "gradient_checkpointing": True, "fuse_projections": fuse,
                    "fuse_norms": fuse, "checkpoint_reentrant": reentrant, "clip_mode": clip_mode,
                    "momentum_bits": momentum_bits, "chunked_loss": chunked_loss}}


def method_env(method: str) -> None:
    """Set the kernel switches a method variant stands for (each block of steps sets its own)."""
    from qft_ds.ops import triton_launch
    os.environ["QFT_DS_LION_LAYOUT"] = "2pass" if method == "qft_2pass" else "auto"
    os.environ["QFT_DS_LION_M4_VEC"] = "0" if method == "qft_m4_bytewise_chunked" else "1"
    triton_launch.MODE = "jit" if method == "qft_jit" else "direct"


def clear_env() -> None:
    from qft_ds.ops import triton_launch
    os.environ.pop("QFT_DS_LION_LAYOUT", None)
    os.environ.pop("QFT_DS_LION_M4_VEC", None)
    triton_launch.MODE = "direct"


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def peaks() -> tuple[float | None, float | None]:
    """(max allocated, max reserved) GiB since the last reset; (None, None) without CUDA (not measured)."""
    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def built_s(t0: float, dev) -> float:
    """Seconds since `t0` once the device has finished (the build's kernels run asynchronously)."""
    sync(dev)
    return round(time.perf_counter() - t0, 2)


def gib(x: float | None) -> str:
    return "n/a (no CUDA)" if x is None else f"{x:.2f} GiB"


def is_oom(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or a CUDA library's allocation failure that reaches Python as a RuntimeError
    (e.g. CUBLAS_STATUS_ALLOC_FAILED from cublasCreate: the QA grid on the H200 met cublasCreate failures
    when memory ran out, bench/NOTES.md)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e)))


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def setup(method, shape, batch, seq, dev, chunk=256):
    """(step function, {"state_bytes_per_param", "params", and for qft the state's parts and settings})."""
    import qft_ds
    if method in QFT_VARIANTS:
        opts = dict(QFT_VARIANTS[method])
        chunked_loss = chunk if opts.pop("chunked", False) else 0
        t0 = time.perf_counter()
        model = build_quantized(shape, dev, opts.get("fuse", True), seq, log=log)
        built = built_s(t0, dev)
        log(f"  {method}: model built in {built:.1f} s; DeepSpeed initialize")
        config = qft_config(batch, chunked_loss=chunked_loss, **opts)
        engine, opt, _, _ = qft_ds.initialize(model=model, config=config)

        extra_sync = method == "qft_sync"

        def step(x):
            loss = engine(input_ids=x, labels=x).loss
            if extra_sync:
                bool(torch.isfinite(loss).all())
            engine.backward(loss)
            engine.step()
        st = opt.state_nbytes()
        n = st["quantized_params"] + st["float_params"]
        return step, {"state_bytes_per_param": (st["quantized_bytes"] + st["float_bytes"]) / n, "params": n,
                      "quantized_params": st["quantized_params"], "float_params": st["float_params"],
                      "momentum_bits": st["momentum_bits"], "qft": config["qft"], "build_s": built,
                      "cpu_checkpointing": "activation_checkpointing" in config}
    if method == "ds_fusedadam":
        import deepspeed
        t0 = time.perf_counter()
        model = build(shape, torch.bfloat16, dev, seq=seq)
        built = built_s(t0, dev)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
            "train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-5, "weight_decay": 0.01}}, "steps_per_print": 10**9})
        n = sum(p.numel() for p in model.parameters())

        def step(x):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        # bf16 weights + fp32 master + fp32 Adam m, v (grads not counted)
        return step, {"state_bytes_per_param": 2 + 4 + 8, "params": n, "build_s": built}
    dtype = torch.float32 if method.startswith("fp32_adamw") else torch.bfloat16
    t0 = time.perf_counter()
    model = build(shape, dtype, dev, reentrant=method.endswith("_reentrant"), seq=seq)
    built = built_s(t0, dev)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if "adamw" in method:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)
        bpp = 3 * dtype.itemsize
    else:
        opt = FP32Lion(params, lr=1e-5, weight_decay=0.1)
        bpp = 2 * dtype.itemsize
    autocast = torch.device(dev).type

    def step(x):
        with torch.autocast(autocast, torch.bfloat16, enabled=dtype == torch.float32):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, {"state_bytes_per_param": bpp, "params": n, "build_s": built}


def measure(method, shape, args, dev):
    batch, seq = batch_seq(shape, args.batch, args.seq)
    row = {"method": method, "model": shape, "batch": batch, "seq": seq, "status": None,
           "params": shape_sizes(shape)["params"], "peak_gib": None, "peak_reserved_gib": None,
           "setup_peak_gib": None, "setup_peak_reserved_gib": None, "setup_s": None, "tok_s": None,
           "state_bytes_per_param": None, "oom": False}
    free_memory()
    method_env(method)
    step = None
    phase = "setup"
    log(f"{shape} {batch}x{seq} {method}: setup")
    t0 = time.perf_counter()
    try:
        step, state = setup(method, shape, batch, seq, dev, args.chunk)
        row.update(state, state_bytes_per_param=round(state["state_bytes_per_param"], 4))
        row["setup_s"] = built_s(t0, dev)
        row["setup_peak_gib"], row["setup_peak_reserved_gib"] = peaks()
        log(f"  {method}: set up in {row['setup_s']} s, peak {gib(row['setup_peak_gib'])}; training")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        phase = "train"
        g = torch.Generator().manual_seed(0)
        times = []
        for i in range(args.warmup + args.iters):
            x = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g).to(dev)
            sync(dev)
            t1 = time.perf_counter()
            step(x)
            sync(dev)
            if i >= args.warmup:
                times.append(time.perf_counter() - t1)
        row["peak_gib"], row["peak_reserved_gib"] = peaks()
        row["step_s"] = statistics.median(times)
        if method in args.profile:
            profile(step, x, f"{method}_{shape}", args.out)
        if method in args.cprofile:
            cprofile(step, x, f"{method}_{shape}", args.out)
        row["tok_s"] = batch * seq / row["step_s"]
        row["status"] = "ok"
    except Exception as e:  # record, keep going: one broken baseline must not hide the others
        if is_oom(e):
            row.update(status="oom", oom=True, oom_phase=phase, error=first_line(e), peak_at_oom_gib=peaks()[0])
        else:
            row.update(status="error", error_phase=phase, error=first_line(e))
    finally:  # the exception (and its frames, which hold the model) is gone here: free what it held
        clear_env()
        step = None
        free_memory()
    log(f"  {shape:>5} {method:>13}: {row['status']}  peak {gib(row['peak_gib'])}  tok/s "
        f"{row['tok_s'] and round(row['tok_s'])}  {row.get('error', '')}")
    return row


def interleaved(shape, methods, args, dev) -> dict:
    """Speed with every method's model resident at once, timed in alternating blocks of `iters` steps
    (the method order rotates each round). The host-bound steps swing by 30% between runs of this
    machine (other tenants' CPU load); a ratio of two methods is only fair when both saw the same
    moments, so the ratio is taken per round and its median reported."""
    batch, seq = batch_seq(shape, args.batch, args.seq)
    steps = {}
    for m in methods:
        method_env(m)
        try:
            steps[m] = setup(m, shape, batch, seq, dev, args.chunk)[0]
        except Exception as e:
            if not is_oom(e):
                raise
            print(f"  interleaved: {m} does not fit next to the others; left out", flush=True)
        finally:
            clear_env()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g).to(dev)
    names = list(steps)
    tok_s = {m: [] for m in names}
    step_s = {m: [] for m in names}  # every timed step, per round: does a method switch cost the next steps?
    for r in range(args.rounds + 1):  # round 0: warm-up, not recorded
        for m in names[r % len(names):] + names[: r % len(names)]:
            method_env(m)
            times = []
            for _ in range(args.iters if r else args.warmup):
                sync(dev)
                t0 = time.perf_counter()
                steps[m](x)
                sync(dev)
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
    free_memory()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1.1b", "7b"], choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--batch", type=int, default=None, help="batch size for every shape (default: the shape's own)")
    p.add_argument("--seq", type=int, default=None, help="sequence length for every shape (default: the shape's own)")
    p.add_argument("--chunk", type=int, default=256, help="qft.chunked_loss tokens for the *_chunked methods (a "
                   "chunk of a 128k vocabulary holds ~4 fp32 [chunk, vocab]: 0.5 GiB at 256, bench/NOTES.md)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--profile", nargs="*", default=[], choices=METHODS, help="profile these methods (2 steps)")
    p.add_argument("--cprofile", nargs="*", default=[], choices=METHODS, help="cProfile these methods (2 steps)")
    p.add_argument("--skip-bandwidth", action="store_true")
    p.add_argument("--rounds", type=int, default=0,
                   help="then time the methods of each shape interleaved, all resident, for this many rounds")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: draw peak memory against model size from these results into --out")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.plot:
        path = Path(args.out or common.RESULTS) / f"memory_speed_size_{time.strftime('%Y%m%d-%H%M')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_size(merge(args.plot), path)
        print(f"wrote {path}")
        return path
    if torch.cuda.is_available():
        dev = "cuda"
    else:  # the CPU checks the script end to end; memory is a GPU figure
        big = [s for s in args.shapes if s != "tiny"]
        if big or not args.skip_bandwidth or args.profile:
            p.error("without CUDA only `--shapes tiny --skip-bandwidth` runs (no --profile): a check of the "
                    f"script, no memory figures (asked: shapes {args.shapes})")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dev = "cpu"
    common.single_process_env()
    result = common.header(args.commit)
    result.update(chunked_loss_tokens=args.chunk, warmup=args.warmup, iters=args.iters,
                  alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    if not args.skip_bandwidth:
        from lion_bandwidth import bandwidths
        result.update(bandwidths(dev))
        log(f"copy {result['copy_gbs']:.0f} GB/s  lion triton {result['lion_triton_gbs']:.0f} GB/s "
            f"({result['lion_triton_ms']:.3f} ms)  lion torch {result['lion_torch_gbs']:.0f} GB/s")
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
    plot_all(result, path)
    print(f"\nwrote {path}")
    print(f"{'model':>9} {'method':>14} {'peak GiB':>9} {'reserved':>9} {'setup s':>8} {'tok/s':>8} {'B/param':>8}")
    for r in result["rows"]:
        peak = r["status"].upper() if r["status"] != "ok" else f"{r['peak_gib'] or float('nan'):.2f}"
        print(f"{r['model']:>9} {r['method']:>14} {peak:>9} {r['peak_reserved_gib'] or float('nan'):9.2f} "
              f"{r['setup_s'] or float('nan'):8.1f} {r['tok_s'] or 0:8.0f} {r['state_bytes_per_param'] or 0:8.3f}")
    return path


if __name__ == "__main__":
    main()
