"""bench/qa_fidelity.py's qft_m4 method (int4 Lion momentum, "momentum_bits": 4), ready for the GPU run."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import qa_fidelity  # noqa: E402
from test_qa_fidelity import _tiny_task  # noqa: E402


def test_qft_m4_trains_with_half_a_byte_less_state_and_is_compared_with_qft(tmp_path, tiny_model_dir):
    assert "qft_m4" in qa_fidelity.METHODS and "qft_m4" in qa_fidelity.SECOND_SEED
    assert qa_fidelity.full_grid(["qft_m4"]) == [f"qft_m4:{lr:g}:0" for lr in qa_fidelity.DEFAULT_GRID["qft"]]
    data = _tiny_task(tmp_path, (("train", 16), ("validation", 4), ("test", 4)))
    common = ["--task", "play", "--data_dir", str(data), "--model", str(tiny_model_dir), "--steps", "1",
              "--warmup", "1", "--bsz", "4", "--eval_every", "1", "--eval_bsz", "4", "--out", str(tmp_path / "out")]
    result = json.loads(qa_fidelity.main([*common, "--runs", "qft_m4:1e-3:0", "qft:1e-3:0"]).read_text())
    q8, q4 = result["rows"]  # in METHODS order
    assert (q8["method"], q4["method"]) == ("qft", "qft_m4") and result["failed"] == []
    assert [s for s, _ in q4["eval_curve"]] == [0, 1] and q4["val_end"] > 0
    assert q4["state_bytes_per_param"] == pytest.approx(q8["state_bytes_per_param"] - 0.5, abs=0.05)
    assert set(result["comparison"]["vs_qft"]) == {"qft_m4"}
