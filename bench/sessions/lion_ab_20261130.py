"""Lion kernel variants paired in one process on one H200, outputs checked bit-equal first (the last version;
session scratch, kept as the record of bench/results/lion_ab_20261130-*.json).

The variants were switched by environment variables that existed only in the working tree during the
session and are gone: QFT_DS_LION_K_FIRST (the [K, RM, G] tile, kept: 00e3bee), a TILES loop of several tiles
per program with the outliers first (dropped: slower), QFT_DS_AB=rows (the scales stored by their holders,
kept: 5626d81) and QFT_DS_AB=late (the outliers after the weight's stores, dropped: slower). The
`_kfirst` and `_tiles` files came from earlier versions of this script (their configurations are
in each row); this is the version of the `_rows` file. bench/NOTES.md has the readings. To time the
kernel today, use bench/lion_bandwidth.py.
"""
import os, json, sys, time
import torch
from triton.testing import do_bench
sys.path.insert(0, os.getcwd())
from qft_ds.ops import get_ops, reference as ref
dev = torch.device("cuda"); n = 4096 * 11008
x = torch.randn(2**28, device=dev); y = torch.empty_like(x)
copy = lambda: 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), return_mode="median") / 1e6
c0 = copy()
w, ws = ref.quantize_blockwise(torch.randn(n, device=dev) * 0.02, 128)
m8 = ref.quantize_blockwise(torch.randn(n, device=dev) * 1e-3, 256)
m4 = ref.quantize_momentum(torch.randn(n, device=dev) * 1e-3, 256, 1, 0, bits=4)
g = (torch.randn(n, device=dev) * 1e-2).bfloat16()
oi = torch.randperm(n, device=dev)[: n // 100].sort().values.to(torch.int32)
ov = torch.randn(n // 100, device=dev) * 0.05
ops = get_ops("triton", dev); st = [0]; rows = []
VARIANTS = [("base", "", ""), ("rows", "rows", ""), ("late", "late", ""), ("rows+late", "rows,late", "")]
def setenv(ab, reg):
    os.environ["QFT_DS_AB"] = ab
    if reg: os.environ["QFT_DS_MAXNREG"] = reg
    else: os.environ.pop("QFT_DS_MAXNREG", None)
def step(mb, tensors, stepno, **kn):
    w_, ws_, mc, msc, ov_ = tensors
    ops.lion_step(w_, ws_, 128, mc, msc, 256, g, lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.1, rounding="sr",
                  seed=0, step=stepno, offset=0, momentum_bits=mb, outlier_idx=oi, outlier_val=ov_, **kn)
for mb in (8, 4):  # the same outputs as base, bit for bit
    outs = {}
    for name, ab, reg in VARIANTS:
        setenv(ab, reg)
        mc, msc = m8 if mb == 8 else m4
        t = [w.clone(), ws.clone(), mc.clone(), msc.clone(), ov.clone()]
        step(mb, t, 1); step(mb, t, 2)
        outs[name] = t
    for name in outs:
        same = all(torch.equal(a, b) for a, b in zip(outs[name], outs["base"]))
        print(f"int{mb} {name}: same bits as base: {same}", flush=True)
        rows.append(dict(check=True, momentum_bits=mb, variant=name, same=same))
def timed(mb, **kn):
    mc, msc = m8 if mb == 8 else m4
    def run():
        st[0] += 1
        step(mb, (w, ws, mc, msc, ov), st[0], **kn)
    t = do_bench(run, return_mode="median")
    nb = n * (2 + 2 * mb / 8 + 2) + 2 * (n // 128 + n // 256) * 4
    return t, nb / t / 1e6
for rep in range(2):
    for mb in (8, 4):
        for name, ab, reg in VARIANTS + [("rows+late p7", "rows,late", "")]:
            setenv(ab, reg)
            kn = {"philox_rounds": 7} if name.endswith("p7") else {}
            t, gbs = timed(mb, **kn)
            rows.append(dict(rep=rep, momentum_bits=mb, variant=name, ms=t, gbs=gbs, frac=gbs / c0))
            print(f"rep{rep} int{mb} {name}: {t*1e3:.1f} us {gbs:.0f} GB/s {gbs/c0:.1%} of copy", flush=True)
c1 = copy()
print(f"copy {c0:.0f} -> {c1:.0f} GB/s")
out = os.environ.get("OUT", "."); json.dump(dict(copy_gbs=c0, copy_gbs_end=c1, rows=rows, device=torch.cuda.get_device_name(),
                                                  date=time.strftime("%Y%m%d-%H%M")), open(f"{out}/ab_lion.json", "w"), indent=1)
