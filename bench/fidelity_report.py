"""Fidelity results: learning-rate selection on the validation play, merging parts, table and plots.

Selection: for each method, the lr whose final *validation* loss (mean over seeds) is lowest; the
held-out plays are only reported at that lr, never used to choose it.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

# Setup keys that must agree for parts to be merged (the same experiment split over several calls).
_SAME = ("model", "steps", "warmup", "bsz", "seq", "heldout", "validation", "eval_blocks", "train_texts")


def select(rows: list[dict], extra: tuple[str, ...] = (), select_seed: int | None = None) -> list[dict]:
    """One summary per method: lr_grid, chosen lr, held-out loss there (mean over seeds), memory, speed, and
    the mean over seeds of each key in ``extra`` (e.g. exact match). With ``select_seed``, the lr is chosen on
    that seed's runs alone (``val_by_lr`` too), so that seeds run later at the chosen lr cannot move it."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["method"]][r["lr"]].append(r)
    out = []
    for method, lrs in by.items():
        mean = lambda runs, k: sum(r[k] for r in runs) / len(runs)  # noqa: E731
        basis = {x: [r for r in v if r["seed"] == select_seed] or v for x, v in lrs.items()} \
            if select_seed is not None else lrs
        lr = min(basis, key=lambda x: mean(basis[x], "val_end"))
        runs = lrs[lr]
        out.append({"method": method, "lr_grid": sorted(lrs), "chosen_lr": lr, "seeds": [r["seed"] for r in runs],
                    "val_end": mean(runs, "val_end"), "eval_start": runs[0]["eval_start"],
                    "eval_end": mean(runs, "eval_end"), "eval_curve": runs[0]["eval_curve"],
                    "peak_gib": max(r["peak_gib"] for r in runs), "tok_s": mean(runs, "tok_s"),
                    "val_by_lr": {str(x): mean(v, "val_end") for x, v in sorted(basis.items())},
                    # the best lr at an end of a grid of 3+: the true optimum may lie outside it
                    "at_grid_edge": len(lrs) >= 3 and lr in (min(lrs), max(lrs)),
                    **{k: mean(runs, k) for k in extra}})
    for r in rows:
        r["lr_grid"] = sorted(by[r["method"]])
        r["chosen"] = any(s["method"] == r["method"] and s["chosen_lr"] == r["lr"] for s in out)
    return out


def merge(paths, same: tuple[str, ...] = _SAME) -> dict:
    """One result from the parts of one experiment: their ``setup`` must agree on the keys ``same``."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    base = parts[0].get("setup", {})
    for path, part in zip(paths[1:], parts[1:]):
        diff = [k for k in same if part.get("setup", {}).get(k) != base.get(k)]
        if diff:
            raise SystemExit(f"--merge: {path} has another setup than {paths[0]} ({', '.join(diff)}); "
                             "only parts of one experiment can be merged")
    out = dict(parts[0])
    out["rows"] = [r for p in parts for r in p["rows"]]
    out["merged_from"] = [Path(p).name for p in paths]
    out["commits"] = sorted({p.get("commit", "unknown") for p in parts})
    return out


def add_solo_speed(result: dict, path) -> None:
    """tok_s of grid runs that shared the GPU understates speed: take each method's from solo runs instead."""
    solo = json.loads(Path(path).read_text())
    shared = [r for r in solo["rows"] if r.get("gpu_shared_by", 1) != 1]
    if shared:
        raise SystemExit(f"--solo {path}: its runs shared the GPU ({shared[0]['method']}); give solo runs")
    speed = {r["method"]: r["tok_s"] for r in solo["rows"]}
    result["solo_speed"] = {"from": Path(path).name, "device": solo.get("device"), "steps": solo["setup"]["steps"],
                            "tok_s": speed}
    for s in result.get("chosen", []):
        s["tok_s_solo"] = speed.get(s["method"])


def plot(result: dict, path: Path) -> list[Path]:
    """Held-out curves (chosen lr bold, others faint) and held-out loss vs peak memory at the chosen lr."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen = result.get("chosen") or []
    colors = {s["method"]: f"C{i}" for i, s in enumerate(chosen)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in result["rows"]:
        xs, ys = zip(*row["eval_curve"])
        c = colors.get(row["method"], "gray")
        if row.get("chosen"):
            ax.plot(xs, ys, color=c, lw=1.8, linestyle="--" if row["seed"] else "-",
                    label=f"{row['method']} lr={row['lr']:g} seed={row['seed']}")
        else:
            ax.plot(xs, ys, color=c, lw=0.7, alpha=0.35)
    shown = [y for row in result["rows"] if row.get("chosen") for _, y in row["eval_curve"]]
    if shown:  # a diverged grid point should not squash the curves that matter
        ax.set_ylim(min(shown) - 0.05, max(shown) + 0.1)
    ax.set(xlabel="step", ylabel="held-out loss",
           title=f"SmolLM2-135M, held-out plays; lr chosen on validation ({result['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths = [path]
    if chosen:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for s in chosen:
            ax.scatter(s["peak_gib"], s["eval_end"], color=colors[s["method"]], s=40)
            ax.annotate(f"{s['method']} ({s['chosen_lr']:g})", (s["peak_gib"], s["eval_end"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="peak GPU memory (GiB)", ylabel="held-out loss at the chosen lr",
               title="loss vs memory (lower left is better)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        scatter = path.with_name(path.stem + "_scatter.png")
        fig.savefig(scatter, dpi=120)
        plt.close(fig)
        paths.append(scatter)
    return paths


def print_table(result: dict) -> None:
    print(f"{'method':>12} {'lr':>8} {'seed':>4} {'val':>7} {'start':>7} {'end':>7} {'peak GiB':>8} {'tok/s':>8}")
    for r in result["rows"]:
        print(f"{r['method']:>12} {r['lr']:>8g} {r['seed']:>4} {r['val_end']:7.4f} {r['eval_start']:7.4f} "
              f"{r['eval_end']:7.4f} {r['peak_gib']:8.2f} {r['tok_s']:8.0f}{'  *' if r.get('chosen') else ''}"
              + (f"  (GPU shared by {r['gpu_shared_by']} runs)" if r.get("gpu_shared_by", 1) > 1 else ""))
    print("\nchosen on the validation play (* above); held-out loss at that lr:")
    for s in result.get("chosen", []):
        speed = f"{s['tok_s_solo']:.0f} tok/s (solo)" if s.get("tok_s_solo") else f"{s['tok_s']:.0f} tok/s"
        print(f"{s['method']:>12}  lr {s['chosen_lr']:g} of {s['lr_grid']}  held-out {s['eval_end']:.4f}  "
              f"peak {s['peak_gib']:.2f} GiB  {speed}"
              + ("  (at the grid's edge: widen it)" if s.get("at_grid_edge") else ""))
