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
    assert [r["step"] for r in rows] == list(range(1, 11))  # --max_steps: the run's length
    for key in ("loss", "lr", "tokens", "seconds", "grad_norm", "peak_gib"):
        assert key in rows[0]
    assert rows[-1]["tokens"] == 10 * 4 * 16
    # and the schedule's horizon: 10 steps, not the config's 12
    assert [r["lr"] for r in rows] == pytest.approx(schedule_lrs(cfg, 10))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_end"] < summary["eval_start"]
    assert "held-out loss" in capsys.readouterr().out


def schedule_lrs(cfg: dict, total: int) -> list[float]:
    """The lr of each step of the config's WarmupCosineLR over `total` steps."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["optimizer"]["params"]["lr"])
    sched = WarmupCosineLR(opt, **{**cfg["scheduler"]["params"], "total_num_steps": total})
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def test_max_steps_above_the_config_sets_the_schedule_horizon(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                              capsys):
    """The README's `--max_steps 100` on a 30-step config trains 100 steps on a 100-step schedule (it used to
    stop at 30). The warm-up stays the config's."""
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=4, warmup_num_steps=2)
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["--deepspeed", str(cfg_path), "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
            "--output_dir", str(out), "--seq_len", "16", "--eval_blocks", "2"]
    train.main([*args, "--max_steps", "9", "--stop_at", "7"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))  # --stop_at: this session ends at 7 ...
    lrs = schedule_lrs(cfg, 9)  # ... on the 9-step schedule
    assert [r["lr"] for r in rows] == pytest.approx(lrs[:7])
    assert "steps: 9 (the LR schedule's horizon), stopping at 7" in capsys.readouterr().out
    train.main([*args, "--resume_from_checkpoint", str(out)])  # no --max_steps: the checkpoint's run's 9
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["lr"] for r in rows] == pytest.approx(lrs)
    with pytest.raises(SystemExit, match="checkpoint is at step 9 and the run ends at 9; to train further, pass "
                                         "--max_steps above 9"):
        train.main([*args, "--resume_from_checkpoint", str(out)])
    train.main([*args, "--resume_from_checkpoint", str(out), "--max_steps", "11"])  # the advice works
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 12))
    assert "the checkpoint's run had 9: the lr from step 10 follows the new horizon" in capsys.readouterr().out


def test_missing_config_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="config file not found"):
        train.main(["--deepspeed", str(tmp_path / "nope.json")])
