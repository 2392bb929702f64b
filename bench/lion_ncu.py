"""Launch the training Lion kernel a few times for Nsight Compute (bench/sessions/h200_next_ncu.sh runs it).

    ncu --clock-control none -k regex:lion_kernel --launch-skip 2 --launch-count 1 --set full \
        --import-source yes -o lion_int8 python bench/lion_ncu.py --momentum_bits 8
    ncu --import lion_int8.ncu-rep --page details > lion_int8.txt

One LLaMA-7B MLP weight (4096 x 11008), bf16 gradient, 1% outliers fused, the training defaults (the
kernels and inputs of lion_bandwidth.py's KEEP_OUTLIERS_SWEEP row that training runs). The first profile
(2026-11-30) found the kernel short of warps, not of issue slots: 84 registers allowed 5 CTAs per SM (31%
occupancy), issue slots were 60% busy, and warps waited on memory and on three CTA barriers; bench/NOTES.md
has the readings and what changed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--momentum_bits", type=int, choices=(8, 4), default=8)
    p.add_argument("--launches", type=int, default=4)
    p.add_argument("--n", type=int, default=4096 * 11008, help="elements (a smaller one for a CPU check)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu with the Triton interpreter (a check only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lion_ncu.py launches the Triton kernel for Nsight Compute: no CUDA device here")
    from qft_ds.ops import get_ops, reference as ref
    dev, n = torch.device(args.device), args.n
    g = torch.Generator(device=dev).manual_seed(0)
    w, ws = ref.quantize_blockwise(torch.randn(n, device=dev, generator=g) * 0.02, 128)
    if args.momentum_bits == 8:
        m, ms = ref.quantize_blockwise(torch.randn(n, device=dev, generator=g) * 1e-3, 256)
    else:
        m, ms = ref.quantize_momentum(torch.randn(n, device=dev, generator=g) * 1e-3, 256, 1, 0, bits=4)
    grad = (torch.randn(n, device=dev, generator=g) * 1e-2).bfloat16()
    o_idx = torch.randperm(n, device=dev, generator=g)[: n // 100].sort().values.to(torch.int32)
    o_val = torch.randn(n // 100, device=dev, generator=g) * 0.05
    ops = get_ops("triton", dev)
    for step in range(1, args.launches + 1):
        ops.lion_step(w, ws, 128, m, ms, 256, grad, lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1,
                      rounding="sr", seed=0, step=step, offset=0, momentum_bits=args.momentum_bits,
                      layout="3d", fused_outliers=True, outlier_idx=o_idx, outlier_val=o_val)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"{args.launches} launches of the int{args.momentum_bits} Lion kernel, 1% outliers fused")
    return {"w": w, "m": m, "outlier_val": o_val}


if __name__ == "__main__":
    main()
