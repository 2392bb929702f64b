"""Copy bandwidth and the int8 Lion kernel's achieved bandwidth on one LLaMA-7B MLP weight, measured in
the same process, over a sweep of launch configurations. `memory_speed.py` records it with every run
(`--skip-bandwidth` leaves it out)."""
from __future__ import annotations

import torch


def bandwidths(dev):
    """Copy bandwidth (read + write) and the int8 Lion kernel's, on a 4096 x 11008 weight.

    Bytes counted per param: int8 w and m read + written (4), the gradient read (2 in bf16, as training
    passes it; 4 in fp32), plus the fp32 group/block scales read + written. The triton kernel is also run
    over a few launch configurations (`sweep`); `lion_kernel_gbs` is the default one, used in training.
    """
    from qft_ds.ops import get_ops, reference as ref
    from triton.testing import do_bench
    x = torch.randn(2**28, device=dev)
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() * 4 / do_bench(lambda x=x, y=y: y.copy_(x), return_mode="median") / 1e6
    del x, y
    n = 4096 * 11008
    out = {"copy_gbs": copy_gbs, "lion_sweep": []}
    w, ws = ref.quantize_blockwise(torch.randn(n, device=dev) * 0.02, 128)
    m, ms = ref.quantize_blockwise(torch.randn(n, device=dev) * 1e-3, 256)
    grads = {"bf16": (torch.randn(n, device=dev) * 1e-2).bfloat16()}
    grads["fp32"] = grads["bf16"].float()
    step = [0]

    def timed(ops, g, **knobs):
        def run():
            step[0] += 1
            ops.lion_step(w, ws, 128, m, ms, 256, g, lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1,
                          rounding="sr", seed=0, step=step[0], offset=0, **knobs)
        ms_ = do_bench(run, return_mode="median")
        nbytes = n * (4 + g.element_size()) + 2 * (n // 128 + n // 256) * 4
        return ms_, nbytes / ms_ / 1e6

    triton_ops, torch_ops = get_ops("triton", dev), get_ops("torch", dev)
    for gname, g in grads.items():
        for layout, chunk, warps, rounds in (("2pass", None, 4, 10), ("2pass", None, 4, 4), ("3d", 2048, 4, 10),
                                             ("3d", 1024, 4, 10), ("3d", 4096, 8, 10), ("3d", 2048, 8, 10),
                                             ("3d", 2048, 4, 4)):
            knobs = dict(layout=layout, chunk=chunk, num_warps=warps, philox_rounds=rounds)
            for bit_convert in ((False, True) if layout == "3d" and chunk == 2048 and warps == 4 else (False,)):
                if bit_convert:  # the same outputs with fewer conversion instructions (bench/kernel_sass.py)
                    knobs = dict(knobs, bit_convert=True)
                ms_, gbs = timed(triton_ops, g, **knobs)
                out["lion_sweep"].append({"grad": gname, **knobs, "ms": ms_, "gbs": gbs})
                print(f"  lion triton grad={gname} {knobs}: {ms_:.3f} ms {gbs:.0f} GB/s", flush=True)
    # With 1% outliers, as in training: the torch ops around the kernel against the fused kernel (the
    # host launch cost is what matters in training; this times the device side only).
    o_idx = torch.randperm(n, device=dev)[: n // 100].sort().values.to(torch.int32)
    o_val = torch.randn(n // 100, device=dev) * 0.05
    for knobs in (dict(layout="2pass"), dict(layout="3d", fused_outliers=True)):
        ms_, gbs = timed(triton_ops, grads["bf16"], outlier_idx=o_idx, outlier_val=o_val, **knobs)
        out["lion_sweep"].append({"grad": "bf16", "outliers": 0.01, **knobs, "ms": ms_, "gbs": gbs})
        print(f"  lion triton with 1% outliers {knobs}: {ms_:.3f} ms", flush=True)
    out["lion_triton_ms"], out["lion_triton_gbs"] = timed(triton_ops, grads["bf16"])
    out["lion_torch_ms"], out["lion_torch_gbs"] = timed(torch_ops, grads["bf16"])
    out["lion_kernel_gbs"] = out["lion_triton_gbs"]
    out["lion_kernel_frac_of_copy"] = out["lion_triton_gbs"] / copy_gbs
    out["lion_bytes_per_param"] = round(4 + 2 + 2 * (1 / 128 + 1 / 256) * 4, 3)
    return out
