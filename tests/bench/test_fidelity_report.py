"""The fidelity report picks each lr on the validation play, merges only one experiment, and takes speed
from solo runs."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fidelity_report as report  # noqa: E402


def row(method, lr, val, held, tok_s=1000.0, shared=1):
    return {"method": method, "lr": lr, "seed": 0, "val_end": val, "eval_start": 4.0, "eval_end": held,
            "eval_curve": [(0, 4.0), (10, held)], "peak_gib": 1.0, "tok_s": tok_s, "gpu_shared_by": shared}


def test_select_uses_validation_not_heldout():
    # 2e-5 has the best held-out loss but 1e-5 the best validation loss: validation decides
    rows = [row("qft", 1e-5, 3.0, 3.5), row("qft", 2e-5, 3.1, 3.2), row("qft", 5e-5, 3.2, 3.3)]
    (s,) = report.select(rows)
    assert s["chosen_lr"] == 1e-5 and s["eval_end"] == 3.5 and s["at_grid_edge"]
    assert [r["chosen"] for r in rows] == [True, False, False]


def test_merge_refuses_another_setup(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"setup": {"steps": 300}, "rows": [row("qft", 1e-5, 3, 3)]}))
    b.write_text(json.dumps({"setup": {"steps": 50}, "rows": [row("qft", 2e-5, 3, 3)]}))
    with pytest.raises(SystemExit, match="steps"):
        report.merge([a, b])


def test_solo_speed_replaces_shared_tok_s(tmp_path):
    result = {"rows": [row("qft", 1e-5, 3, 3, tok_s=100.0, shared=8)]}
    result["chosen"] = report.select(result["rows"])
    solo = tmp_path / "solo.json"
    solo.write_text(json.dumps({"device": "x", "setup": {"steps": 40}, "rows": [row("qft", 1e-5, 3, 3, 900.0)]}))
    report.add_solo_speed(result, solo)
    assert result["chosen"][0]["tok_s_solo"] == 900.0 and result["solo_speed"]["steps"] == 40
    solo.write_text(json.dumps({"setup": {"steps": 40}, "rows": [row("qft", 1e-5, 3, 3, 90.0, shared=2)]}))
    with pytest.raises(SystemExit, match="shared the GPU"):
        report.add_solo_speed(result, solo)


def test_grid_script_parses_and_default_grids_hold_three_lrs():
    import subprocess
    here = Path(__file__).resolve().parents[2] / "bench"
    assert subprocess.run(["bash", "-n", str(here / "fidelity_grid.sh")]).returncode == 0
    import fidelity
    assert set(fidelity.DEFAULT_GRID) == set(fidelity.METHODS) - {"qft_rtn", "qft_ef"}
    assert all(len(g) == 3 and g == sorted(g) for g in fidelity.DEFAULT_GRID.values())
    assert fidelity.grid_runs(["qft", "lora=1e-4"], [0, 1]) == [
        "qft:5e-05:0", "qft:5e-05:1", "qft:0.0001:0", "qft:0.0001:1", "qft:0.0002:0", "qft:0.0002:1", "lora:0.0001:0",
        "lora:0.0001:1"]
