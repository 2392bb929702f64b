"""Can the int8 weight's outliers cost less? (issue 15) A CPU measurement at conversion, not a fine-tuning run.

For each outlier_frac, the real default model (SmolLM2-135M-Instruct, fp32) is converted by qft_ds's own
convert_model (fp32 compute, so that only quantization differs) and measured on the Shakespeare held-out
plays (the first 64 blocks of 256 tokens, as train.py and bench/fidelity.py do):
- the held-out loss, and against the fp32 model's logits on the first --logit_blocks blocks: the mean
  KL(fp32 || converted) per token and the relative RMS error of the logits;
- per weight: the fraction of its energy (sum of squares) in the outliers, the relative error of the
  dequantized weight, outliers per row and per group;
- the bytes of each outlier storage in bench/outlier_encodings.py, built as tensors from the real
  outliers (positions decoded back and checked), with fp32, bf16 or fp16 values; bf16/fp16 values are also
  measured in the loss (--value_fracs) and as their rounding error and grid spacing against the int8 step
  of the outlier's group (an update rounded onto a grid coarser than the int8 step moves less often);
- the total model state per quantized parameter (int8 codes, scales, outliers, int8 momentum with its scales),
  today's 2.135 reproduced from HybridWeight.state_nbytes.

    python bench/outlier_cost.py --commit $(git rev-parse HEAD)      # about 20 minutes on 2 shared CPU cores

Writes bench/results/outlier_cost_<time>.json and a PNG of held-out loss against state bytes/param.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import outlier_encodings as enc  # noqa: E402

FRACS = (0.0, 0.0025, 0.005, 0.01, 0.02)


def quantile_summary(x: torch.Tensor) -> dict:
    if not x.numel():
        return {"n": 0}
    x = x.double()
    return {"n": x.numel(), "median": x.median().item(), "p99": torch.quantile(x[:2**24], 0.99).item(),
            "max": x.max().item(), "frac_over_half": (x > 0.5).double().mean().item()}


class Census:
    """Statistics of each HybridWeight as convert_model makes it, with the full-precision weight it came from:
    convert_model's `fetch` hands each module's weight out (fused projections: every member, then the stacked
    HybridWeight), `on_weight` then sees the HybridWeight. Nothing full-precision is kept."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.rows: list[dict] = []
        self.ratios = {v: {"error": [], "ulp": []} for v in enc.VALUES if v != "fp32"}

    def fetch(self, module) -> torch.Tensor:
        self.pending.append(module.weight.detach())
        return self.pending[-1]

    def on_weight(self, qw) -> None:
        if not self.pending:
            raise RuntimeError(f"no full-precision weight was fetched for the HybridWeight of shape {qw.shape} "
                               "(an experts layer? convert_model quantizes those without fetch)")
        w = torch.cat(self.pending).reshape(-1).float()
        self.pending.clear()
        self.rows.append(weight_stats(qw, w, self.ratios))


def weight_stats(qw, w: torch.Tensor, ratios: dict | None = None) -> dict:
    """One HybridWeight against its full-precision flat weight `w`: errors, energy, counts and every storage's
    bytes (each storage's positions decoded back and compared with the outliers' indices)."""
    idx, val = qw.outlier_idx.long(), qw.outlier_val
    rows, cols = qw.shape
    deq = qw.dequantize().reshape(-1)
    w2 = w.square().sum().item()
    row = {"shape": list(qw.shape), "group": qw.group, "numel": qw.numel, "outliers": idx.numel(),
           "w_sq": w2, "err_sq": {"fp32": (deq - w).square().sum().item()},
           "energy_frac": val.square().sum().item() / w2 if w2 else 0.0,
           "max_per_row": int(torch.bincount(idx // cols, minlength=1).max()),
           "max_per_group": int(torch.bincount(idx // qw.group, minlength=1).max()),
           "groups_over_15": int((torch.bincount(idx // qw.group) > 15).sum()) if idx.numel() else 0,
           "codes_bytes": qw.codes.numel() * qw.codes.element_size(),
           "scales_bytes": qw.scales.numel() * qw.scales.element_size(),
           "state_nbytes": qw.state_nbytes(), "positions": {}, "values": {}}
    from qft_ds.quant.momentum import MomentumFormat
    from qft_ds.config import QFTConfig
    cfg = QFTConfig()
    row["momentum_bytes"] = sum(t.numel() * t.element_size() for t in
                                MomentumFormat(cfg.momentum_bits, cfg.block_size).zeros(qw.numel, "cpu").values())
    step = qw.scales[idx // qw.group] if idx.numel() else val
    for value in enc.VALUES:
        row["values"][value] = val.numel() * enc.VALUES[value].itemsize
        if value == "fp32":
            continue
        moved = enc.rounded_values(val, value) - val
        row["err_sq"][value] = row["err_sq"]["fp32"] + moved.square().sum().item()
        if ratios is not None and idx.numel():
            ok = step > 0  # a group of outliers only has no dense step to compare with
            ratios[value]["error"].append(moved.abs()[ok] / step[ok])
            ratios[value]["ulp"].append(enc.ulp(val, value)[ok] / step[ok])
    for scheme in enc.POSITIONS:
        tensors = enc.encode_positions(scheme, idx, qw.shape, qw.group, qw.codes)
        if not torch.equal(enc.decode_positions(scheme, tensors, qw.shape, qw.group), idx):
            raise RuntimeError(f"{scheme}: positions of the weight of shape {qw.shape} do not decode back")
        row["positions"][scheme] = enc.position_nbytes(scheme, tensors)
    if row["state_nbytes"] != row["codes_bytes"] + row["scales_bytes"] + row["positions"]["flat_int32"] \
            + row["values"]["fp32"]:
        raise RuntimeError(f"HybridWeight.state_nbytes of shape {qw.shape} is not codes + scales + today's outliers")
    return row


def summarize(rows: list[dict]) -> dict:
    """Totals over a model's weights: bytes/param of each storage and of the whole state, errors, counts."""
    n = sum(r["numel"] for r in rows)
    base = sum(r["codes_bytes"] + r["scales_bytes"] + r["momentum_bytes"] for r in rows)
    storage = {}
    for scheme in enc.POSITIONS:
        for value in enc.VALUES:
            b = sum(r["positions"][scheme] + r["values"][value] for r in rows)
            storage[f"{scheme}+{value}"] = {"outlier_bytes_per_param": b / n, "state_bytes_per_param": (base + b) / n}
    today = sum(r["state_nbytes"] + r["momentum_bytes"] for r in rows) / n
    w2 = sum(r["w_sq"] for r in rows)
    energy = sorted(r["energy_frac"] for r in rows)
    return {"quantized_params": n, "outliers": sum(r["outliers"] for r in rows), "weights": len(rows),
            "today_state_bytes_per_param": today, "storage": storage,
            "weight_rel_err": {v: (sum(r["err_sq"][v] for r in rows) / w2) ** 0.5 for v in rows[0]["err_sq"]},
            "energy_frac_all": sum(r["energy_frac"] * r["w_sq"] for r in rows) / w2,
            "energy_frac_per_weight": {"min": energy[0], "median": energy[len(energy) // 2], "max": energy[-1]},
            "max_per_row": max(r["max_per_row"] for r in rows), "max_per_group": max(r["max_per_group"] for r in rows),
            "groups_over_15": sum(r["groups_over_15"] for r in rows),
            "widest_row": max(r["shape"][1] for r in rows), "groups": sorted({r["group"] for r in rows})}


def convert(model, frac: float, group_size: int):
    """A converted copy of `model` (fp32 compute) and the census of its weights."""
    from qft_ds.nn.convert import convert_model
    census = Census()
    m = copy.deepcopy(model)
    weights = convert_model(m, group_size=group_size, outlier_frac=frac, compute_dtype=torch.float32,
                            fetch=census.fetch, on_weight=census.on_weight)
    if len(weights) != len(census.rows):
        raise RuntimeError(f"{len(weights)} weights converted, {len(census.rows)} seen by the census")
    return m.eval(), weights, census


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, bsz: int, ref_logp: torch.Tensor | None = None, logit_blocks: int = 0):
    """Mean held-out loss over `blocks`; with `ref_logp` (fp32 log-probs of the first blocks), the mean KL
    per token and the relative RMS logit error against it; without, the log-probs to use as that reference."""
    model.eval()
    total, kl, err2, ref2, mine = 0.0, 0.0, 0.0, 0.0, []
    for i in range(0, len(blocks), bsz):
        x = blocks[i:i + bsz]
        out = model(input_ids=x, labels=x)
        total += out.loss.float().item() * len(x)
        take = max(0, min(logit_blocks - i, len(x)))
        if take:
            logp = F.log_softmax(out.logits[:take].float(), -1)
            if ref_logp is None:
                mine.append(logp)
            else:
                r = ref_logp[i:i + take]
                kl += (r.exp() * (r - logp)).sum().item()
                # logits are defined up to a constant per token: compare the centred log-probs
                d = (logp - logp.mean(-1, keepdim=True)) - (r - r.mean(-1, keepdim=True))
                err2 += d.square().sum().item()
                ref2 += (r - r.mean(-1, keepdim=True)).square().sum().item()
    res = {"loss": total / len(blocks)}
    if ref_logp is None:
        return res, (torch.cat(mine) if mine else None)
    if logit_blocks:
        res.update(kl_per_token=kl / (min(logit_blocks, len(blocks)) * blocks.shape[1]),
                   logit_rel_rms=(err2 / ref2) ** 0.5)
    return res, None


def measure(model, blocks, fracs, value_fracs, group_size, bsz, logit_blocks, log=print) -> dict:
    """Every measurement of this benchmark for one model and held-out blocks (the tests run it on a tiny one)."""
    fp32, ref_logp = evaluate(model, blocks, bsz, logit_blocks=logit_blocks)
    log(f"fp32 model: held-out loss {fp32['loss']:.4f}")
    rows = []
    for frac in fracs:
        m, weights, census = convert(model, frac, group_size)
        row = {"outlier_frac": frac, **summarize(census.rows), "eval": {}}
        row["value_vs_int8_step"] = {v: {k: quantile_summary(torch.cat(x) if x else torch.zeros(0))
                                         for k, x in r.items()} for v, r in census.ratios.items()}
        exact = [w.outlier_val.clone() for w in weights]
        for value in enc.VALUES:
            if value != "fp32" and (frac == 0 or frac not in value_fracs):
                continue
            for w, v in zip(weights, exact):
                w.outlier_val = enc.rounded_values(v, value)
            row["eval"][value], _ = evaluate(m, blocks, bsz, ref_logp, logit_blocks)
            log(f"outlier_frac {frac}, {value} values: held-out loss {row['eval'][value]['loss']:.4f}, "
                f"KL {row['eval'][value].get('kl_per_token', float('nan')):.5f}, "
                f"today's state {row['today_state_bytes_per_param']:.4f} B/param")
        rows.append(row)
        del m, weights
    return {"fp32": fp32, "rows": rows}


PLOTTED = {"fp32": "-", "fp16": "--", "bf16": ":"}  # line style per value dtype


def plot(result: dict, path: Path) -> Path:
    """Held-out loss (left) and KL to the fp32 model (right) against state bytes/param, a line per storage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(enc.POSITIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, metric in zip(axes, ("loss", "kl_per_token")):
        for scheme in enc.POSITIONS:
            for value, style in PLOTTED.items():
                pts = [(r["storage"][f"{scheme}+{value}"]["state_bytes_per_param"], r["eval"][value][metric])
                       for r in result["rows"] if value in r["eval"]]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o" if value == "fp32" else "x", ms=5, color=colors[scheme],
                            label=f"{scheme} + {value}" if value == "fp32" or scheme == "code_marker" else None)
        today = next((r for r in result["rows"] if r["outlier_frac"] == 0.01), None)
        if today is not None:
            ax.plot(today["today_state_bytes_per_param"], today["eval"]["fp32"][metric], "k*", ms=12,
                    label="today (1%, flat_int32 + fp32)")
        for r in result["rows"]:
            x = r["storage"]["flat_int32+fp32"]["state_bytes_per_param"]
            ax.annotate(f"{100 * r['outlier_frac']:g}%", (x, r["eval"]["fp32"][metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("model state bytes / quantized param (int8 w + scales + outliers + int8 momentum)")
    axes[0].axhline(result["fp32"]["loss"], color="grey", lw=0.8, label="fp32 model")
    axes[0].set_ylabel("held-out loss at conversion")
    axes[1].set_ylabel(f"KL(fp32 || converted) per token, first {result['settings']['logit_blocks']} blocks")
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Outlier storage, {result['settings']['model']}: points are outlier_frac (labels on today's "
                 "storage); x marks: 16-bit values", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", help="the commit measured (recorded in the result)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fracs", type=float, nargs="+", default=list(FRACS))
    p.add_argument("--value_fracs", type=float, nargs="*", default=[0.01],
                   help="fractions at which bf16 and fp16 outlier values are also measured in the loss")
    p.add_argument("--eval_blocks", type=int, default=None, help="held-out blocks (default: textdata's)")
    p.add_argument("--logit_blocks", type=int, default=4, help="blocks compared with the fp32 logits")
    p.add_argument("--bsz", type=int, default=8)
    p.add_argument("--out_dir", type=Path, default=None)
    p.add_argument("--plot", type=Path, help="only redraw the PNG of this result file")
    args = p.parse_args(argv)
    if args.plot:
        print(f"wrote {plot(json.loads(args.plot.read_text()), args.plot.with_suffix('.png'))}")
        return
    from qft_ds import hub, textdata
    from qft_ds.config import QFTConfig
    torch.manual_seed(0)
    model, tok = hub.load_model_and_tokenizer(args.model, dtype=torch.float32)
    blocks = textdata.tokenize_blocks(tok, textdata.shakespeare_splits().heldout, textdata.HELDOUT_SEQ_LEN,
                                      max_blocks=args.eval_blocks or textdata.HELDOUT_BLOCKS, split="held-out")
    group_size = QFTConfig().group_size
    settings = {"model": args.model, "heldout_plays": list(textdata.HELDOUT_PLAYS), "blocks": list(blocks.shape),
                "group_size": group_size, "compute": "fp32", "fracs": args.fracs, "value_fracs": args.value_fracs,
                "logit_blocks": args.logit_blocks, "chunk": enc.CHUNK}
    result = {**common.header(args.commit), "settings": settings,
              **measure(model, blocks, args.fracs, args.value_fracs, group_size, args.bsz, args.logit_blocks)}
    path = common.write_result("outlier_cost", result, args.out_dir)
    print(f"wrote {path} and {plot(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
