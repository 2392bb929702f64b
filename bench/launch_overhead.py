"""Host time per call of the pieces a host-bound QFT step is made of (CUDA only).

The 1.1B step is host-bound (bench/NOTES.md): the GPU idles while Python enqueues ~8.6k kernels. This
times the host side of each piece on tiny tensors, so the GPU is never the limit: a torch op, a Triton
launch through the JIT and straight through the compiled kernel, the Lion update's Python path, and a
QLinear forward + backward against torch.nn.Linear's under the same autocast. Median of repeats, all in
one process; the figures are host microseconds per call.

    python bench/launch_overhead.py --commit $(git rev-parse HEAD)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def host_us(fn, calls=200, repeats=7) -> float:
    """Median host microseconds per call; the queue is drained between repeats, not inside one."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--cprofile", action="store_true", help="also cProfile 500 QLinear forward + backward calls")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead.py measures CUDA launches: no CUDA device here")
    from qft_ds import ops
    from qft_ds.nn.qmodules import QLinear
    from qft_ds.optim.lion import QFTLion
    from qft_ds.quant.hybrid import HybridWeight
    from qft_ds.ops import triton_kernels as tk
    dev = torch.device("cuda")
    ops.configure("triton")
    rows = {}

    a = torch.randn(1024, device=dev)
    b = torch.randn(1024, device=dev)
    c = torch.empty_like(a)
    rows["torch_mul"] = host_us(lambda: torch.mul(a, b, out=c))

    codes = torch.randint(-127, 128, (4096,), dtype=torch.int8, device=dev)
    scales = torch.rand(32, device=dev)
    out = torch.empty(4096, device=dev)
    compiled = tk.dequant_kernel[(1,)](codes, scales, out, 4096, G=128, BLOCK=4096)
    rows["triton_jit_launch"] = host_us(lambda: tk.dequant_kernel[(1,)](codes, scales, out, 4096, G=128, BLOCK=4096))
    direct = compiled[(1, 1, 1)]  # every argument in order, constexprs included
    rows["triton_direct_launch"] = host_us(lambda: direct(codes, scales, out, 4096, 128, 4096))

    torch.manual_seed(0)
    w = HybridWeight(torch.randn(256, 1024, device=dev) * 0.02)
    w.n_uses = 1
    opt = QFTLion([w.anchor], lr=1e-5, weight_decay=0.1, backend="triton")
    opt.init_state()
    grad = torch.randn(256, 1024, device=dev, dtype=torch.bfloat16) * 1e-3
    st = opt._qstate(w)
    t = ops.get_ops("triton", dev)
    finite = torch.ones((), dtype=torch.bool, device=dev)  # training passes the gradient's device flag
    kw = dict(lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr", seed=0, step=0, offset=0,
              outlier_idx=w.outlier_idx, outlier_val=w.outlier_val, finite=finite)
    rows["lion_step_ops"] = host_us(lambda: t.lion_step(w.codes, w.scales, w.group, st["m_codes"], st["m_scales"],
                                                        256, grad, **kw))
    rows["qftlion_apply"] = host_us(lambda: opt._apply(w, grad))  # + norm, finite flag, clip coefficient
    rows["hybrid_dequantize_bf16"] = host_us(lambda: w.dequantize(torch.bfloat16))
    from qft_ds.ops import triton_launch  # the same three through Triton's JIT launch path
    triton_launch.MODE = "jit"
    rows["lion_step_ops_jit_launch"] = host_us(lambda: t.lion_step(w.codes, w.scales, w.group, st["m_codes"],
                                                                   st["m_scales"], 256, grad, **kw))
    rows["qftlion_apply_jit_launch"] = host_us(lambda: opt._apply(w, grad))
    rows["hybrid_dequantize_bf16_jit_launch"] = host_us(lambda: w.dequantize(torch.bfloat16))
    triton_launch.MODE = "direct"

    x = torch.randn(4, 32, 1024, device=dev, requires_grad=True)
    q = QLinear(w, compute_dtype=torch.bfloat16)
    lin = torch.nn.Linear(1024, 256, bias=False, device=dev)

    def fwd_bwd(mod):
        def run():
            with torch.autocast("cuda", torch.bfloat16):
                y = mod(x)
            y.sum().backward()
        return run
    rows["qlinear_fwd_bwd"] = host_us(fwd_bwd(q), calls=100)
    rows["nn_linear_fwd_bwd"] = host_us(fwd_bwd(lin), calls=100)

    # the same, split: forward alone (graph built, then dropped), and backward without the Lion update
    def fwd(mod):
        def run():
            with torch.autocast("cuda", torch.bfloat16):
                mod(x)
        return run
    rows["qlinear_fwd"] = host_us(fwd(q), calls=100)
    rows["nn_linear_fwd"] = host_us(fwd(lin), calls=100)
    import qft_ds.nn.qmodules as qm
    deliver, qm.deliver = qm.deliver, lambda weight, g, uses=1: None
    rows["qlinear_fwd_bwd_no_update"] = host_us(fwd_bwd(q), calls=100)
    qm.deliver = deliver
    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    rows["vector_norm"] = host_us(lambda: torch.linalg.vector_norm(grad, dtype=torch.float32))
    rows["isfinite"] = host_us(lambda: torch.isfinite(norm))
    rows["python_sum_range_1000"] = host_us(lambda: sum(range(1000)))  # the host CPU's Python speed
    opt._norms = []

    # which launches and host work one QLinear forward + backward is made of
    from torch.profiler import ProfilerActivity, profile
    run = fwd_bwd(q)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50)
    opt._norms = []

    if args.cprofile:  # Python-level host time of one QLinear forward + backward, backward on this thread
        import cProfile
        import io
        import pstats
        torch.autograd.set_multithreading_enabled(False)  # cProfile sees only the calling thread
        run = fwd_bwd(q)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            run()
        torch.cuda.synchronize()
        prof.disable()
        torch.autograd.set_multithreading_enabled(True)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
        print(buf.getvalue())
        opt._norms = []

    result = {**common.header(args.commit), "unit": "host microseconds per call", "rows": rows,
              "qlinear_fwd_bwd_profile_10_calls": table.splitlines()}
    path = common.write_result("launch_overhead", result, args.out)
    for k, v in rows.items():
        print(f"  {k:>24}: {v:8.1f} us")
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
