"""Host microseconds of each piece of a QLinear forward, on CUDA, in isolation (a diagnostic for
bench/NOTES.md: where the custom autograd Function's extra host time goes). Tiny tensors: the GPU is
never the limit. Prints one line per piece.

    python bench/qlinear_host.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_overhead import host_us  # noqa: E402


def main():
    if not torch.cuda.is_available():
        raise SystemExit("qlinear_host.py times CUDA launches: no CUDA device here")
    from qft_ds import ops
    from qft_ds.nn.qmodules import QLinear, _QLinearFn
    from qft_ds.quant.hybrid import HybridWeight
    ops.configure("triton")
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w = HybridWeight(torch.randn(256, 1024, device=dev) * 0.02)
    q = QLinear(w, compute_dtype=bf16)
    x = torch.randn(4, 32, 1024, device=dev, requires_grad=True)
    xc = x.detach().to(bf16)
    wd = w.dequantize(bf16)
    lin = torch.nn.Linear(1024, 256, bias=False, device=dev)
    ac = torch.autocast("cuda", bf16)
    rows = {
        "x.to(bf16)": lambda: x.to(bf16),
        "dequantize": lambda: w.dequantize(bf16),
        "F.linear bf16 (no grad)": lambda: F.linear(xc, wd),
        "is_autocast_enabled": lambda: torch.is_autocast_enabled("cuda"),
    }
    for name, fn in rows.items():
        print(f"{name:>40}: {host_us(fn):7.1f} us", flush=True)

    def under_autocast(fn, grad=True):
        def run():
            with ac, torch.set_grad_enabled(grad):
                fn()
        return run
    pieces = {
        "autocast enter/exit": lambda: None,
        "nn.Linear(x)": lambda: lin(x),
        "F.linear(x, w fp32)": lambda: F.linear(x, lin.weight),
        "_QLinearFn.apply": lambda: _QLinearFn.apply(x, w.anchor, w, bf16, False),
        "QLinear(x)": lambda: q(x),
    }
    for name, fn in pieces.items():
        print(f"{name + ' [autocast, grad]':>40}: {host_us(under_autocast(fn)):7.1f} us", flush=True)
    for name in ("_QLinearFn.apply", "nn.Linear(x)"):
        print(f"{name + ' [autocast, no grad]':>40}: {host_us(under_autocast(pieces[name], False)):7.1f} us",
              flush=True)
    print(f"{'_QLinearFn.apply [no autocast, grad]':>40}: {host_us(pieces['_QLinearFn.apply']):7.1f} us", flush=True)


if __name__ == "__main__":
    main()
