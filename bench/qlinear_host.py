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
    from qft_ds.nn import qmodules
    from qft_ds.quant.hybrid import HybridWeight
    ops.configure("triton")
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w = HybridWeight(torch.randn(256, 1024, device=dev) * 0.02)
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

    # forward, and forward + backward (the weight's gradient delivered to nothing), under autocast:
    # torch's nn.Linear against qlinear's two paths (Python autograd Function; torch's matmul backward)
    paths = {
        "nn.Linear": lambda: lin(x),
        "qlinear Function path": lambda: qmodules.qlinear(x, w, bf16, keep_weight=False),
        "qlinear torch-backward path": lambda: qmodules.qlinear(x, w, bf16, keep_weight=True),
    }
    deliver, qmodules.deliver = qmodules.deliver, lambda weight, g, uses=1: None
    for name, fn in paths.items():
        def fwd(fn=fn):
            with ac:
                return fn()

        def fwd_bwd(fn=fn):
            fwd(fn).sum().backward()
        print(f"{name + ' fwd':>40}: {host_us(fwd):7.1f} us   fwd+bwd: {host_us(fwd_bwd, calls=100):7.1f} us",
              flush=True)
    qmodules.deliver = deliver


if __name__ == "__main__":
    main()
