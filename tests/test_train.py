"""train.py end to end on a tiny local model and a text file: metrics, --max_steps, held-out loss."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def test_train_writes_metrics_and_learns(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"]["params"].update(total_num_steps=12, warmup_num_steps=1)
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    train.main(["--deepspeed", str(cfg_path), "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
                "--output_dir", str(out), "--max_steps", "10", "--seq_len", "16", "--eval_blocks", "4"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # --max_steps stops early
    for key in ("loss", "lr", "tokens", "seconds", "grad_norm", "peak_gib"):
        assert key in rows[0]
    assert rows[-1]["tokens"] == 10 * 4 * 16
    # the schedule's horizon is the config's 12 steps, not --max_steps 10
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = WarmupCosineLR(opt, **cfg["scheduler"]["params"])
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert [r["lr"] for r in rows] == pytest.approx(lrs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_end"] < summary["eval_start"]
    assert "held-out loss" in capsys.readouterr().out


def test_missing_config_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="config file not found"):
        train.main(["--deepspeed", str(tmp_path / "nope.json")])
