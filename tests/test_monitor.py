"""Monitoring: DeepSpeed's CSV monitor gets qft_ds's per-step numbers; `qft_ds plot` draws metrics.jsonl."""
import json
import sys
from pathlib import Path

import pytest

from qft_ds.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_csv_monitor_and_plot(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=5, warmup_num_steps=1)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "qft"}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    train.main(["--deepspeed", str(tmp_path / "c.json"), "--model", str(tiny_model_dir), "--dataset",
                str(tiny_text_file), "--output_dir", str(out), "--seq_len", "16", "--eval_blocks", "2",
                "--no-save_final"])
    files = {p.name: p for p in (tmp_path / "csv").rglob("*.csv")}
    for name in ("loss", "lr", "tokens_per_s", "peak_memory_gib", "skipped_steps", "partial_steps"):
        f = next(p for n, p in files.items() if n.endswith(f"{name}.csv"))
        lines = f.read_text().splitlines()
        assert len(lines) == 1 + 5, (name, lines)  # a header and one row per step
    assert not (out / "latest").exists()  # --no-save_final
    assert main(["plot", str(out)]) == 0
    png = out / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def write_run(run, n=40, summary=True):
    """A metrics.jsonl (and summary.json) as train.py writes them: a falling, noisy loss, a warm-up then decay."""
    rows, tokens, seconds = [], 0, 0.0
    for s in range(1, n + 1):
        tokens, seconds = tokens + 512, seconds + (9.0 if s == 1 else 1.0)  # step 1 pays for compilation
        rows.append({"step": s, "loss": 4.0 - 0.02 * s + (0.3 if s % 2 else -0.3), "lr": 1e-5 * min(s, 5) / 5,
                     "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "peak_gib": 1.5,
                     "skipped": s == 7, "skipped_steps": int(s >= 7), "partial_steps": 0, "grad_norm": 1.0})
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (run / "summary.json").write_text(json.dumps({"steps": n, "start_step": 0, "eval_start": 4.1,
                                                      "eval_end": 3.4}))
    return rows


def test_plot_draws_smoothed_loss_heldout_points_and_zero_based_rates(tmp_path):
    from qft_ds import plotting
    rows = write_run(tmp_path / "run")
    fig = plotting.draw(rows, json.loads((tmp_path / "run" / "summary.json").read_text()))
    loss_ax, lr_ax, tok_ax, mem_ax = fig.axes
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    smoothed = next(ln for label, ln in lines.items() if label.startswith("train loss (EMA"))
    raw = [r["loss"] for r in rows]
    ys = list(smoothed.get_ydata())
    # past its first steps (bias-corrected, they follow the raw points), the +-0.3 zig-zag is averaged away
    half = len(rows) // 2
    assert max(abs(a - b) for a, b in zip(ys[half + 1:], ys[half:])) < 0.3 * 0.6
    held = lines["held-out loss"]
    assert list(held.get_xdata()) == [0, 40] and list(held.get_ydata()) == [4.1, 3.4]
    for ax in (lr_ax, tok_ax, mem_ax):
        assert ax.get_ylim()[0] == 0
    rates = plotting.step_rates(rows)
    assert rates[0] == rows[0]["tok_s"] and rates[1] == 512.0  # each step's own rate, not the running mean
    marks = [ln for ln in loss_ax.get_lines() if ln.get_color() == "red"]
    assert [ln.get_xdata()[0] for ln in marks] == [7]  # the skipped step


def test_plot_writes_the_png_from_metrics_alone(tmp_path, capsys):
    write_run(tmp_path / "run", summary=False)  # a run still going: no summary.json yet
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 0
    png = tmp_path / "p.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_smooth_is_unbiased_at_the_start_and_skips_non_finite():
    from qft_ds.plotting import smooth
    assert smooth([2.0, 2.0, 2.0], span=10) == [2.0, 2.0, 2.0]  # no pull towards 0
    out = smooth([1.0, float("nan"), 1.0], span=3)
    assert out == [1.0, 1.0, 1.0]


def test_plot_joins_the_heldout_losses_measured_along_the_run(tmp_path):
    """train.py --eval_every writes eval_loss into some metrics rows: drawn in step order with the start and
    end points of summary.json, joined by a line (two points alone are not joined)."""
    from qft_ds import plotting
    rows = write_run(tmp_path / "run")
    for r in rows:
        if r["step"] in (10, 20, 30):
            r["eval_loss"] = 4.1 - 0.02 * r["step"]
    fig = plotting.draw(rows, json.loads((tmp_path / "run" / "summary.json").read_text()))
    held = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}["held-out loss"]
    assert list(held.get_xdata()) == [0, 10, 20, 30, 40]
    assert list(held.get_ydata()) == pytest.approx([4.1, 3.9, 3.7, 3.5, 3.4])
    assert held.get_linestyle() == "-"
    assert plotting.heldout_points(None, rows) == [(10, pytest.approx(3.9)), (20, pytest.approx(3.7)),
                                                   (30, pytest.approx(3.5))]
