"""`qft_ds` command line. `qft_ds report` prints which kernel backends can run here, like `ds_report`."""
from __future__ import annotations

import argparse
import sys


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qft_ds", description="qft_ds tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("report", help="which kernel backends can run on this machine, and why not")
    args = p.parse_args(argv)
    if args.cmd == "report":
        return report()
    return 1


if __name__ == "__main__":
    sys.exit(main())
