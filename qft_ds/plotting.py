"""`qft_ds plot RUN_DIR`: one PNG of a train.py run, from RUN_DIR/metrics.jsonl (and summary.json once it ends).

- loss: every step's training loss (faint), a smoothed curve (an exponential moving average with bias
  correction, TensorBoard's kind, spanning 10% of the steps, at least 5), and the held-out loss as points (at
  the session's start and the run's end, from summary.json, and every `eval_loss` row of train.py --eval_every); skipped steps as red vertical lines. Its y axis is
  not pinned at 0: a loss has no meaningful 0 for text, and the change is what the panel shows;
- lr, throughput (tokens per second of each step, and the session's running average) and peak memory,
  each with its y axis from 0, so that a dip reads at its true size.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from qft_ds.monitor import read_metrics


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average of weight 2/(span+1), bias-corrected (the first points are not pulled
    towards 0); non-finite values (a skipped step's NaN loss) are left out of it."""
    a, avg, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        if math.isfinite(v):
            avg, weight = (1 - a) * avg + a * v, (1 - a) * weight + a
        out.append(avg / weight if weight else float("nan"))
    return out


def step_rates(rows: list[dict]) -> list[float]:
    """Tokens per second of each step, from the cumulative "tokens" and "seconds" of consecutive rows (the
    first step also holds compilation and warm-up: that is what it cost)."""
    rates, tokens, seconds = [], None, None
    for r in rows:
        if tokens is not None and r["seconds"] > seconds:
            rates.append((r["tokens"] - tokens) / (r["seconds"] - seconds))
        else:
            rates.append(r.get("tok_s", float("nan")))  # the first row of a session: its average is its rate
        tokens, seconds = r["tokens"], r["seconds"]
    return rates


def heldout_points(summary: dict | None, rows: list[dict] = ()) -> list[tuple[int, float]]:
    """(step, held-out loss), in step order: the session's start and the run's end from train.py's
    summary.json, and every `eval_loss` of metrics.jsonl (train.py --eval_every)."""
    points = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if summary:
        points += [(summary.get("start_step", 0), summary.get("eval_start")),
                   (summary.get("steps"), summary.get("eval_end"))]
    return sorted((s, v) for s, v in points if s is not None and v is not None)


def draw(rows: list[dict], summary: dict | None = None, title: str = ""):
    """The figure (matplotlib, Agg): loss on top, lr / tok/s / peak memory below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig = plt.figure(figsize=(11, 7))
    grid = fig.add_gridspec(2, 3, height_ratios=(3, 2))
    ax = fig.add_subplot(grid[0, :])
    ax.plot(steps, losses, lw=0.8, alpha=0.35, color="tab:blue", label="train loss (each step)")
    span = max(5, len(rows) // 10)
    ax.plot(steps, smooth(losses, span), lw=2, color="tab:blue", label=f"train loss (EMA, span {span})")
    points = heldout_points(summary, rows)
    if points:  # joined only when measured along the run (--eval_every); two points alone say nothing between
        ax.plot(*zip(*points), "o-" if len(points) > 2 else "o", color="tab:green", ms=6, label="held-out loss")
        for s, v in (points[0], points[-1]):
            ax.annotate(f"{v:.3f}", (s, v), textcoords="offset points", xytext=(4, 6), color="tab:green")
    for i, step in enumerate(r["step"] for r in rows if r.get("skipped")):  # their loss is NaN or inf: a line
        ax.axvline(step, color="red", lw=0.8, alpha=0.6, label=None if i else "skipped step (non-finite)")
    ax.set_ylabel("loss")
    ax.set_xlabel("optimizer step")
    ax.legend(loc="upper right")
    ax.set_title(title)
    lr_ax, tok_ax, mem_ax = (fig.add_subplot(grid[1, i]) for i in range(3))
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:purple")
    lr_ax.set_ylabel("learning rate")
    rates = step_rates(rows)
    tok_ax.plot(steps, rates, lw=0.8, alpha=0.5, color="tab:orange", label="each step")
    tok_ax.plot(steps, [r.get("tok_s", float("nan")) for r in rows], color="tab:orange", label="session average")
    tok_ax.set_ylabel("tokens / s")
    tok_ax.legend(loc="lower right", fontsize=8)
    mem_ax.plot(steps, [r.get("peak_gib", float("nan")) for r in rows], color="tab:gray")
    mem_ax.set_ylabel("peak memory (GiB)")
    for a in (lr_ax, tok_ax, mem_ax):
        a.set_xlabel("optimizer step")
        a.set_ylim(bottom=0)
        a.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    fig.tight_layout()
    return fig


def plot(run_dir, out: str | None = None) -> Path:
    """Write the PNG (default RUN_DIR/metrics.png) of RUN_DIR/metrics.jsonl; returns its path."""
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    summary_file = Path(run_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    fig = draw(rows, summary, title=str(run_dir))
    path = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
