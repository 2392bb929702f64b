"""train.py with ds_configs/peqa.json and qst.json on a tiny local model: metrics, learning, exact resume."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def write_config(tmp_path, name, lr):
    cfg = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["scheduler"]["params"].update(total_num_steps=8, warmup_num_steps=1)
    if name == "qst":
        cfg["qft"].update(r=4, adapter_rank=4)  # hidden 64
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def run(cfg, model, data, out, *extra):
    train.main(["--deepspeed", str(cfg), "--model", str(model), "--dataset", str(data), "--output_dir", str(out),
                "--seq_len", "16", "--eval_blocks", "4", *extra])
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name,lr", [("peqa", 3e-2), ("qst", 1e-2)])
def test_train_py_runs_each_method_and_learns(name, lr, tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    summary = run(write_config(tmp_path, name, lr), tiny_model_dir, tiny_text_file, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["grad_norm"] is not None for r in rows)
    assert summary["eval_end"] < summary["eval_start"]
    assert summary["state"]["trainable_params"] > 0 and summary["state"]["bytes_per_quantized_param"] < 0.6


def test_peqa_resume_is_exact(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = write_config(tmp_path, "peqa", 3e-2)
    straight = run(cfg, tiny_model_dir, tiny_text_file, tmp_path / "a", "--max_steps", "6")
    run(cfg, tiny_model_dir, tiny_text_file, tmp_path / "b", "--max_steps", "6", "--stop_at", "4")
    resumed = run(cfg, tiny_model_dir, tiny_text_file, tmp_path / "b", "--max_steps", "6",
                  "--resume_from_checkpoint", str(tmp_path / "b"))
    assert resumed["state_sha256"] == straight["state_sha256"]
