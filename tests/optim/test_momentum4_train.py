"""train.py with "qft": {"momentum_bits": 4}: the start-up line says so and counts the smaller state, a
resumed run is bit-identical to an unbroken one, and resuming with int8 momentum is refused by name."""
import json
import sys
from pathlib import Path

import pytest

from qft_ds import checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def write_config(tmp_path, bits, total=6):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"]["params"].update(total_num_steps=total, warmup_num_steps=2)
    cfg.setdefault("qft", {})["momentum_bits"] = bits
    path = tmp_path / f"qft-m{bits}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_train(cfg, model_dir, text, out, *extra):
    train.main(["--deepspeed", str(cfg), "--model", str(model_dir), "--dataset", str(text), "--output_dir",
                str(out), "--seq_len", "16", "--eval_blocks", "2", *extra])


def rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def bytes_per_param(line):
    return float(line.split("state: ")[1].split(" bytes")[0])


def test_int4_momentum_resumes_bit_exact_through_train_py(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg4, cfg8 = write_config(tmp_path, 4), write_config(tmp_path, 8)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(cfg4, tiny_model_dir, tiny_text_file, straight, "--max_steps", "6")
    line4 = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model: "))
    assert "momentum: int4" in line4
    run_train(cfg8, tiny_model_dir, tiny_text_file, tmp_path / "int8", "--max_steps", "1")
    line8 = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model: "))
    assert "momentum: int8" in line8
    assert bytes_per_param(line4) < bytes_per_param(line8) - 0.4  # half a byte per param less, minus rounding
    run_train(cfg4, tiny_model_dir, tiny_text_file, split, "--max_steps", "6", "--stop_at", "3")
    run_train(cfg4, tiny_model_dir, tiny_text_file, split, "--max_steps", "6", "--resume_from_checkpoint", str(split))
    a, b = rows(straight), rows(split)
    for step in (4, 5, 6):  # bit-identical: ==, not approx
        assert (a[step]["loss"], a[step]["lr"]) == (b[step]["loss"], b[step]["lr"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, split))
    assert sa["state_sha256"] == sb["state_sha256"]
    meta = checkpoint.read_meta(split / "checkpoint-6")
    assert meta["optimizer"]["qft"]["momentum_bits"] == 4
    with pytest.raises((SystemExit, ValueError), match="momentum_bits"):
        run_train(cfg8, tiny_model_dir, tiny_text_file, split, "--max_steps", "8", "--resume_from_checkpoint",
                  str(split))
