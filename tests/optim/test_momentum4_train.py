"""train.py with "qft": {"momentum_bits": 4}: the start-up line says so and counts the smaller state, a
resumed run is bit-identical to an unbroken one, and resuming with int8 momentum is refused by name."""
import json
import sys
from pathlib import Path

import pytest

from qft_ds import checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_checkpoint import rows, run_train  # noqa: E402
from test_checkpoint import write_config as write_base_config  # noqa: E402


def write_config(tmp_path, bits, total=6):
    """qft.json with momentum_bits `bits` (its other qft keys kept), through test_checkpoint's writer."""
    base = json.loads((ROOT / "ds_configs" / "qft.json").read_text())["qft"]
    return write_base_config(tmp_path, total, qft={**base, "momentum_bits": bits})


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
