"""Peak memory of quantizing one big weight (HybridWeight's constructor), counted on the CPU (issue 15).

Every storage made while the constructor runs is counted live (bench/live_bytes.py, the "all" count: this path
runs plain torch ops on the GPU too, no kernel stand-ins). The bf16 input existed before and is not counted;
the transient is the peak less the state the weight keeps (codes, scales, outliers).

    python bench/quantize_memory.py --shapes 32000x4096 128256x4096

Writes bench/results/quantize_memory_<time>.json. To measure an older HybridWeight, put that checkout's
package first on PYTHONPATH; `--label` names it in the JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from live_bytes import LiveBytes

import qft_ds
from qft_ds.quant.hybrid import HybridWeight

GIB = 2 ** 30


def measure(rows: int, cols: int, group_size: int, outlier_frac: float) -> dict:
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    t0 = time.perf_counter()
    with LiveBytes() as probe:
        hw = HybridWeight(w, group_size, outlier_frac)
    seconds = time.perf_counter() - t0
    state = hw.state_nbytes()
    top = list(probe.composition("all").items())[:6]
    return {"shape": [rows, cols], "input_dtype": "bfloat16", "input_gib": w.numel() * 2 / GIB,
            "peak_gib": probe.peak["all"] / GIB, "state_gib": state / GIB,
            "transient_gib": (probe.peak["all"] - state) / GIB,
            "transient_bytes_per_element": (probe.peak["all"] - state) / w.numel(), "seconds": seconds,
            "at_peak": {k: round(v[0] / GIB, 4) for k, v in top}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["32000x4096"], help="ROWSxCOLS of each weight")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--outlier_frac", type=float, default=0.01)
    p.add_argument("--label", default="current", help="names the measured code in the JSON")
    args = p.parse_args()
    rows = []
    for shape in args.shapes:
        r, c = (int(x) for x in shape.lower().split("x"))
        row = measure(r, c, args.group_size, args.outlier_frac)
        print(f"{shape}: peak {row['peak_gib']:.3f} GiB, state {row['state_gib']:.3f}, transient "
              f"{row['transient_gib']:.3f} ({row['transient_bytes_per_element']:.2f} B/element), "
              f"{row['seconds']:.1f} s", flush=True)
        rows.append(row)
    out = Path(__file__).resolve().parent / "results" / f"quantize_memory_{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"label": args.label, "package": str(Path(qft_ds.__file__).parent.name),
                               "torch": torch.__version__, "group_size": args.group_size,
                               "outlier_frac": args.outlier_frac, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
