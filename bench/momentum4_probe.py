"""How often does quantized Lion momentum change Lion's update direction? A CPU proxy, not the fidelity benchmark.

Lion applies sign(b1*m + (1-b1)*g). This runs momenta on the same synthetic gradient stream, each on its own
trajectory (as in training): fp32, int8 and int4 (qft_ds's reference ops: blockwise, one scale per block,
stochastically rounded) and two int4 probes (VARIANTS), and counts the elements whose update sign differs from the fp32 momentum's.
Gradients: per element g_t = a_i * (mu_i + noise_t), with a_i lognormal (magnitudes spread within a block, so a
block's absmax is set by a few large elements and the int4 grid is coarse for the rest) and mu_i the
element's signal (signal-to-noise `snr`). Real gradients are not these; the QA benchmark decides
(bench/qa_fidelity.py, method qft_m4).

    python bench/momentum4_probe.py [--n 1048576] [--steps 300] [--commit HASH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from qft_ds.ops import reference as ref  # noqa: E402


# name: (bits, block, scale rounded up to a power of two). Only int8 and int4 (block 256, absmax scale) are
# qft_ds's formats; the other two are probes of what might cut int4's noise (not implemented in the kernels).
VARIANTS = {"int8": (8, 256, False), "int4": (4, 256, False), "int4_b64": (4, 64, False), "int4_pow2": (4, 256, True)}


def quantize(m, bits, block, pow2, key):
    """qft_ds's momentum rounding (reference), or with power-of-two scales: a block's grid then stays put
    while its absmax drifts within a binade, so its codes are not re-rounded onto a new grid every step."""
    if not pow2:
        return ref.quantize_momentum(m, block, key, 0, bits)
    s = ref.absmax_scales(m, block, ref.QMAX4)
    s = ((s.view(torch.int32) + 0x7FFFFF) & ~0x7FFFFF).view(torch.float32)  # round up to 2^k (0 stays 0)
    codes, scales = ref.quantize_blockwise(m, block, "sr", key, 0, scales=s, qmax=ref.QMAX4)
    return ref.pack_int4(codes), scales


def run(n: int, steps: int, snr: float, spread: float, b1=0.9, b2=0.99, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(spread * torch.randn(n, generator=g))
    mu = snr * torch.randn(n, generator=g)
    m32 = torch.zeros(n)
    state = {name: quantize(torch.zeros(n), bits, block, pow2, 0) for name, (bits, block, pow2) in VARIANTS.items()}
    flips = {name: [] for name in VARIANTS}
    err = {name: [] for name in VARIANTS}
    for t in range(steps):
        grad = scale * (mu + torch.randn(n, generator=g))
        want = torch.sign(torch.lerp(m32, grad, 1 - b1))
        m32.lerp_(grad, 1 - b2)
        for name, (bits, block, pow2) in VARIANTS.items():
            m = ref.dequantize_momentum(*state[name], block, n, bits)
            flips[name].append((torch.sign(torch.lerp(m, grad, 1 - b1)) != want).float().mean().item())
            m.lerp_(grad, 1 - b2)
            state[name] = quantize(m, bits, block, pow2, ref.rng_key(seed, t, ref.STREAM_MOMENTUM))
            m = ref.dequantize_momentum(*state[name], block, n, bits)
            err[name].append(((m - m32).norm() / m32.norm()).item())
    tail = slice(steps // 3, None)  # after the EMA's warm-up
    return {"snr": snr, "spread": spread,
            **{f"{k}_sign_flip": sum(v[tail]) / len(v[tail]) for k, v in flips.items()},
            **{f"{k}_rel_err_vs_fp32": sum(v[tail]) / len(v[tail]) for k, v in err.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for snr in (0.1, 0.3, 1.0):
        for spread in (0.0, 1.0):
            rows.append(run(args.n, args.steps, snr, spread))
            r = rows[-1]
            print(f"snr {snr:>4} spread {spread}: update sign differs from fp32 momentum's on "
                  + ", ".join(f"{100 * r[k + '_sign_flip']:.2f}% ({k})" for k in VARIANTS) + "; momentum rel. error "
                  + " / ".join(f"{r[k + '_rel_err_vs_fp32']:.3f}" for k in VARIANTS), flush=True)
    out = common.header(args.commit)
    out["setup"] = {"n": args.n, "steps": args.steps, "variants": {k: dict(zip(("bits", "block", "pow2_scale"), v))
                                                                   for k, v in VARIANTS.items()}, "betas": [0.9, 0.99],
                    "averaged_over": "steps after the first third", "gradient": "a_i * (mu_i + N(0,1)), "
                    "a_i = exp(spread * N(0,1)), mu_i = snr * N(0,1)", "ops": "qft_ds reference (CPU)"}
    out["rows"] = rows
    print(common.write_result("momentum4_probe", out))


if __name__ == "__main__":
    main()
