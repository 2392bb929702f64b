"""`qft_ds` command line.

- `qft_ds report`: which kernel backends can run here, like `ds_report`;
- `qft_ds export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32] [--int8 | --lowbit]`: an HF folder from a
  checkpoint (`--lowbit`: a PEQA checkpoint kept 3/4-bit; a QST checkpoint: qft_ds's QST format);
- `qft_ds plot RUN_DIR [--out PNG]`: loss (smoothed, held-out points), lr, tok/s and peak memory over steps
  from RUN_DIR/metrics.jsonl;
- `qft_ds consolidate CHECKPOINT OUT_DIR`: a plain (one-device) checkpoint from a sharded ZeRO one.
"""
from __future__ import annotations

import argparse
import sys

# Each command imports what it needs when it runs: torch and the package take seconds to import, and
# `qft_ds --help` or `qft_ds plot` need neither.


def report() -> int:
    import torch

    from qft_ds.ops import get_ops, report as ops_report
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"qft_ds ops report (torch {torch.__version__})")
    print(f"{'backend':<10} {'device':<6} {'ok':<4} reason")
    for dev in devices:
        for name, ok, why in ops_report(dev):
            print(f"{name:<10} {dev:<6} {'yes' if ok else 'no':<4} {why}")
        print(f"{'auto':<10} {dev:<6} {'->':<4} {get_ops('auto', dev).backend}")
    return 0


def _user_errors(tool: str, run, errors=None):
    """run(), or None after one line on stderr when it fails for a reason the user can fix (exit status 2): a bad
    checkpoint, or an OSError writing OUT_DIR (an existing folder, a read-only path, a full disk)."""
    if errors is None:
        from qft_ds.checkpoint_io import CheckpointError
        errors = (CheckpointError, OSError)
    try:
        return run()
    except errors as e:
        print(f"qft_ds {tool}: {e}", file=sys.stderr)
        return None


def export(args) -> int:
    from qft_ds.export import export as run_export
    out = _user_errors("export", lambda: run_export(args.checkpoint, args.out_dir, dtype=args.dtype, int8=args.int8,
                                                    max_shard_gb=args.max_shard_gb, lowbit=args.lowbit))
    if out is None:
        return 2
    what = ("QST (load with qft_ds.methods.load_qst; plain transformers refuses it)" if (out / "qst.json").is_file()
            else "int8 (load with qft_ds.export.load_int8)" if args.int8 else
            "PEQA low-bit (load with qft_ds.methods.load_peqa)" if args.lowbit else f"{args.dtype} (AutoModelForCausalLM)")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"exported {args.checkpoint} -> {out}: {what}, {size:.1f} MiB")
    return 0


def consolidate(args) -> int:
    from qft_ds.zero.consolidate import consolidate as run_consolidate
    out = _user_errors("consolidate", lambda: run_consolidate(args.checkpoint, args.out_dir))
    if out is None:
        return 2
    print(f"consolidated {args.checkpoint} -> {out} (a plain checkpoint: resume on one device, or export)")
    return 0


def plot(args) -> int:
    from qft_ds.monitor import plot as run_plot
    path = _user_errors("plot", lambda: run_plot(args.run_dir, args.out), (FileNotFoundError, ValueError))
    if path is None:
        return 2
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qft_ds", description="qft_ds tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("report", help="which kernel backends can run on this machine, and why not")
    e = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint-STEP folder, or a run folder (its latest checkpoint)")
    e.add_argument("out_dir", help="a new (or empty) folder")
    e.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="dense dtype (default bf16)")
    e.add_argument("--int8", action="store_true", help="keep int8 codes + scales + outliers (qft_ds loader)")
    e.add_argument("--lowbit", action="store_true",
                   help="PEQA checkpoints: keep packed 3/4-bit codes + zero points + scales (qft_ds loader)")
    e.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    pl = sub.add_parser("plot", help="PNG of loss, lr, tok/s and peak memory over steps of a train.py run")
    pl.add_argument("run_dir", help="a train.py output_dir (holds metrics.jsonl)")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    c = sub.add_parser("consolidate", help="a plain checkpoint from a sharded ZeRO one, one weight at a time")
    c.add_argument("checkpoint", help="a ZeRO checkpoint-STEP folder, or a run folder (its latest checkpoint)")
    c.add_argument("out_dir", help="a new (or empty) folder")
    args = p.parse_args(argv)
    if args.cmd == "export":
        if args.int8 and args.dtype:
            p.error("--int8 keeps the int8 form; --dtype applies to dense exports only")
        if args.lowbit and (args.dtype or args.int8):
            p.error("--lowbit keeps the low-bit form; --dtype and --int8 do not apply to it")
        args.dtype = args.dtype or "bf16"
    return {"report": lambda: report(), "export": lambda: export(args), "plot": lambda: plot(args),
            "consolidate": lambda: consolidate(args)}[args.cmd]()


if __name__ == "__main__":
    sys.exit(main())
