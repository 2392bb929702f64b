"""The Lion kernel's memory ceiling on one GPU: a kernel with lion_kernel_3d's streams, tile and launch (bf16
gradient read, int8 weight and momentum read and written, the per-group and per-block fp32 scales read and
written; 2048 elements per program, 4 warps) but almost no arithmetic, timed against a copy in the same
process. What it reaches bounds what the Lion kernel can reach: the gap between them is the arithmetic's.
Session scratch (bench/NOTES.md has the reading); prints one JSON line (the 0728 result file is its
output before the header fields were added: commit 432e568, 2026-11-30 07:28 UTC).

    python bench/sessions/lion_ceiling_20261130.py --commit SHA
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def streams_kernel(w_ptr, ws_ptr, m_ptr, ms_ptr, g_ptr, n, G: tl.constexpr, K: tl.constexpr, RM: tl.constexpr):
    """w += m, m += int8(g), scales * 1: every byte of the Lion kernel's streams moves, one op per element."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (RM * K * G)
    left = n - start
    glocal = tl.arange(0, RM)[None, :] * K + tl.arange(0, K)[:, None]
    local = glocal[:, :, None] * G + tl.arange(0, G)[None, None, :]
    mask = local < left
    g = tl.load(g_ptr + start + local, mask=mask, other=0.0)
    w = tl.load(w_ptr + start + local, mask=mask, other=0)
    m = tl.load(m_ptr + start + local, mask=mask, other=0)
    s = tl.load(ws_ptr + start // G + glocal, mask=glocal * G < left, other=0.0)
    rm = tl.arange(0, RM)
    ms = tl.load(ms_ptr + start // (K * G) + rm, mask=rm * (K * G) < left, other=0.0)
    tl.store(w_ptr + start + local, w + m, mask=mask)
    tl.store(m_ptr + start + local, m + g.to(tl.int8), mask=mask)
    tl.store(ws_ptr + start // G + glocal, s * 1.0000001, mask=glocal * G < left)
    tl.store(ms_ptr + start // (K * G) + rm, ms * 1.0000001, mask=rm * (K * G) < left)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import common
    from lion_bandwidth import copy_gbs, lion_bytes
    dev = torch.device("cuda")
    n = 4096 * 11008
    c0 = copy_gbs(dev)
    w = torch.randint(-127, 128, (n,), dtype=torch.int8, device=dev)
    m = torch.randint(-127, 128, (n,), dtype=torch.int8, device=dev)
    ws, ms = torch.rand(n // 128, device=dev), torch.rand(n // 256, device=dev)
    g = (torch.randn(n, device=dev) * 1e-2).bfloat16()
    chunk = 2048
    grid = (triton.cdiv(n, chunk),)
    t = do_bench(lambda: streams_kernel[grid](w, ws, m, ms, g, n, G=128, K=2, RM=chunk // 256, num_warps=4),
                 return_mode="median")
    c1 = copy_gbs(dev)
    gbs = lion_bytes(n) / t / 1e6
    print(json.dumps({**common.header(args.commit), "n": n, "chunk": chunk, "num_warps": 4, "ms": t, "gbs": gbs,
                      "copy_gbs": c0, "copy_gbs_end": c1, "frac_of_copy": gbs / c0}))


if __name__ == "__main__":
    main()
