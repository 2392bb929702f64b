"""Per-step metrics: DeepSpeed's monitor (CSV / TensorBoard / W&B from the config), and reading metrics.jsonl
for `qft_ds plot` (drawn by qft_ds.plotting).

train.py writes one metrics row per optimizer step to metrics.jsonl; `write_events` sends the same
numbers to whatever monitors the config's "csv_monitor" / "tensorboard" / "wandb" sections enabled.
"""
from __future__ import annotations

import json
from pathlib import Path

# metrics.jsonl key -> monitor event name
EVENTS = {"loss": "Train/qft/loss", "lr": "Train/qft/lr", "tok_s": "Train/qft/tokens_per_s",
          "peak_gib": "Train/qft/peak_memory_gib", "skipped_steps": "Train/qft/skipped_steps",
          "partial_steps": "Train/qft/partial_steps", "grad_norm": "Train/qft/grad_norm"}


def write_events(engine, row: dict) -> None:
    """Send one metrics row to DeepSpeed's monitors (a no-op unless the config enables one)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled:
        return
    events = [(name, float(row[key]), int(row["step"])) for key, name in EVENTS.items()
              if row.get(key) is not None]
    monitor.write_events(events)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the output_dir of a train.py run")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return rows


def plot(run_dir, out: str | None = None) -> Path:
    """The run's PNG (qft_ds.plotting): loss with its smoothed curve and held-out points, lr, tok/s, memory."""
    from qft_ds import plotting  # matplotlib only when plotting
    return plotting.plot(run_dir, out)
