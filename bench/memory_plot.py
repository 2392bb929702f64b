"""The plots of bench/memory_speed.py: per shape bars (peak, tok/s), the interleaved timing, and peak memory
against model size with the GPU card sizes drawn, from one result or several merged (`--plot a.json b.json`:
the 70B shape is measured in its own GPU call)."""
from __future__ import annotations

import json
from pathlib import Path

CARDS_GB = (12, 16, 24, 80, 141)  # card sizes as sold: GB = 1e9 bytes
MARKERS = "osD^vP*X<>"  # with the 10 colours: 100 methods told apart
GIB = 2**30


def status(row: dict) -> str:
    """ok / oom / error; rows written before the "status" key carry only "oom" and "error"."""
    if row.get("status"):
        return row["status"]
    return "oom" if row.get("oom") else "error" if row.get("error") else "ok"


def merge(paths) -> dict:
    """The rows of several memory_speed results in one result. A row of the same method, shape and batch x seq
    in a later file replaces the earlier one (said on stdout); each row keeps its file in "source"."""
    rows: dict[tuple, dict] = {}
    devices, commits = [], []
    for path in paths:
        result = json.loads(Path(path).read_text())
        if "rows" not in result:
            raise ValueError(f"{path}: no 'rows': not a bench/memory_speed.py result")
        devices.append(result.get("device", "?"))
        commits.append(result.get("commit", "?"))
        for row in result["rows"]:
            key = (row["method"], row["model"], row["batch"], row["seq"])
            if key in rows:
                print(f"  {row['method']} {row['model']} {row['batch']}x{row['seq']}: {path} replaces "
                      f"{rows[key]['source']}")
            rows[key] = {**row, "source": Path(path).name}
    return {"device": " + ".join(dict.fromkeys(devices)), "commit": " + ".join(dict.fromkeys(commits)),
            "sources": [Path(p).name for p in paths], "rows": list(rows.values())}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _why_not_drawn(row: dict) -> str:
    if not row.get("params"):
        return "no parameter count in the row"
    if status(row) == "ok":
        return "no peak (measured without CUDA)"
    return f"{status(row)}: {row.get('error', '')}".rstrip(": ")


def plot_size(result: dict, path: Path) -> list[str]:
    """Peak allocated memory (filled markers; reserved hollow) against billions of parameters, one series per
    method, with horizontal lines at the card sizes. A method that ran out of memory gets an x at the top at
    its shape's size. Returns the rows not drawn (errors, rows without a size or a peak), also printed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 6))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    left_out = []
    for i, method in enumerate(methods):
        color, marker = f"C{i % 10}", MARKERS[i // 10 % len(MARKERS)]
        rows = sorted((r for r in result["rows"] if r["method"] == method and r.get("params")),
                      key=lambda r: r["params"])
        ok = [r for r in rows if status(r) == "ok" and r.get("peak_gib") is not None]
        xs = [r["params"] / 1e9 for r in ok]
        ax.plot(xs, [r["peak_gib"] for r in ok], marker=marker, color=color, label=method)
        reserved = [(r["params"] / 1e9, r["peak_reserved_gib"]) for r in ok if r.get("peak_reserved_gib")]
        if reserved:
            ax.scatter(*zip(*reserved), facecolors="none", edgecolors=color, s=60)
        oom = [r["params"] / 1e9 for r in rows if status(r) == "oom"]
        if oom:  # at the top of the axes: an OOM has no peak to draw
            ax.scatter(oom, [0.97] * len(oom), marker="x", s=70, color=color, transform=ax.get_xaxis_transform(),
                       label=f"{method}: out of memory")
        drawn = {id(r) for r in ok} | {id(r) for r in rows if status(r) == "oom"}
        left_out += [f"{r['method']} {r['model']} {r['batch']}x{r['seq']}: {_why_not_drawn(r)}"
                     for r in result["rows"] if r["method"] == method and id(r) not in drawn]
    for gb in CARDS_GB:
        ax.axhline(gb * 1e9 / GIB, color="0.5", ls="--", lw=0.8)
        ax.text(1.0, gb * 1e9 / GIB, f" {gb} GB", transform=ax.get_yaxis_transform(), va="center", fontsize=8,
                color="0.3")
    ax.plot([], [], color="0.5", ls="--", lw=0.8, label="card sizes, GB = 1e9 bytes (drawn at GB x 1e9 / 2^30 GiB)")
    ax.scatter([], [], facecolors="none", edgecolors="0.3", s=60, label="hollow: max_memory_reserved")
    shapes = {(r["model"], r["batch"], r["seq"]): r["params"] / 1e9 for r in result["rows"] if r.get("params")}
    for (model, batch, seq), x in shapes.items():
        ax.text(x, 0.01, f"{model} {batch}x{seq}", rotation=90, fontsize=7, va="bottom", ha="right", color="0.3",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    sizes = list(shapes.values()) or [1.0]  # a log axis needs positive limits even with nothing drawn
    ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
    ax.set_xlabel("model size (billions of parameters)")
    ax.set_ylabel("peak GiB (torch.cuda.max_memory_allocated)")
    ax.set_ylim(0, max([150.0] + [r["peak_gib"] * 1.05 for r in result["rows"]
                                  if status(r) == "ok" and r.get("peak_gib")]))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1))
    commits = result["commit"].split(" + ")
    commit = commits[0] if len(commits) == 1 else f"{len(commits)} commits, {commits[0]} to {commits[-1]}"
    ax.set_title(f"qft_ds: peak memory against model size\n{result['device']} ({commit})", fontsize=9)
    if left_out:
        fig.text(0.01, 0.005, "not drawn: " + "; ".join(left_out), fontsize=6, va="bottom", wrap=True)
        print("  size plot, not drawn: " + "; ".join(left_out))
    fig.tight_layout(rect=(0, 0.04 if left_out else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return left_out


def plot_methods(result: dict, path: Path) -> None:
    """Per shape: bars of peak GiB and tokens/s for each method (OOM and errors marked)."""
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False)
    for j, shape in enumerate(shapes):
        rows = [r for r in result["rows"] if r["model"] == shape]
        names = [r["method"] for r in rows]
        for i, (key, label) in enumerate((("peak_gib", "peak GiB"), ("tok_s", "tokens/s"))):
            ax = axes[i][j]
            vals = [r.get(key) or 0 if status(r) == "ok" else 0 for r in rows]
            bars = ax.bar(names, vals, color=["C0" if n.startswith("qft") else "C7" for n in names])
            for b, r in zip(bars, rows):
                if status(r) != "ok":
                    ax.text(b.get_x() + b.get_width() / 2, 0, "OOM" if status(r) == "oom" else "error",
                            ha="center", va="bottom", color="red")
            ax.set_ylabel(label)
            ax.set_title(f"{shape} (bsz {rows[0]['batch']}x{rows[0]['seq']})")
            ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"qft_ds memory and speed ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_interleaved(result: dict, path: Path) -> None:
    """Per-round tok/s of the interleaved timing (the fair comparison on a noisy host) and the median of
    the per-round ratios to fp32 AdamW."""
    plt = _pyplot()
    runs = result["interleaved"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for i, (m, vals) in enumerate(run["tok_s_per_round"].items()):
            ax.plot(range(1, len(vals) + 1), vals, marker="o", color=f"C{i}",
                    label=m + (f" ({run['ratio_to_fp32_adamw'][m]['median']:.2f}x)"
                               if m in run.get("ratio_to_fp32_adamw", {}) else ""))
        ax.set_xlabel("round (methods alternate within a round)")
        ax.set_xticks(range(1, run["rounds"] + 1))
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{run['model']}: {run['steps_per_block']} steps per block")
        ax.legend(fontsize=8)
    fig.suptitle(f"interleaved speed; (median per-round ratio to fp32 AdamW)\n{result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(result: dict, path: Path) -> list[Path]:
    """Every plot of one run beside its JSON `path`: <stem>.png (bars), <stem>_size.png and, with interleaved
    timing, <stem>_interleaved.png."""
    out = [path.with_suffix(".png"), path.with_name(path.stem + "_size.png")]
    plot_methods(result, out[0])
    plot_size(result, out[1])
    if result.get("interleaved"):
        out.append(path.with_name(path.stem + "_interleaved.png"))
        plot_interleaved(result, out[-1])
    return out
