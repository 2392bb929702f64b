"""A QA grid finished over several GPU calls (bench/qa_grid.sh's PREVIOUS): the runs an earlier call finished
are skipped, and a run that failed there and finished later is not reported as failed."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "bench")]
import qa_fidelity  # noqa: E402
from test_qa_fidelity import _part, _row  # noqa: E402


def test_skip_done_leaves_out_finished_runs(tmp_path):
    prev = _part(tmp_path, "prev.json", [_row("qft", 5e-5, 0, 0.9, 0.9, 0.1, 0.1),
                                         _row("fp32_lion", 1e-4, 0, 0.9, 0.9, 0.1, 0.1)])
    assert qa_fidelity.done_runs([prev]) == {"qft:5e-05:0", "fp32_lion:0.0001:0"}
    left = [r for r in qa_fidelity.full_grid() if r not in qa_fidelity.done_runs([prev])]
    assert "qft:5e-05:0" not in left and "qft:2e-05:0" in left
    assert len(left) == len(qa_fidelity.full_grid()) - 2


def test_merge_drops_a_failure_that_a_later_call_finished(tmp_path):
    prev = tmp_path / "prev.json"
    first = json.loads(Path(_part(tmp_path, "p.json", [_row("qft", 2e-5, 0, 0.9, 0.9, 0.1, 0.1)])).read_text())
    first["failed"] = [{"run": "qft:5e-05:0", "error": "OutOfMemoryError"},
                       {"run": "fp32_lion:1e-05:0", "error": "OutOfMemoryError"}]
    prev.write_text(json.dumps(first))
    later = _part(tmp_path, "later.json", [_row("qft", 5e-5, 0, 0.8, 0.8, 0.2, 0.2),
                                           _row("fp32_lion", 2e-5, 0, 0.85, 0.85, 0.2, 0.2)])
    result = qa_fidelity.merge([str(prev), later])
    assert [f["run"] for f in result["failed"]] == ["fp32_lion:1e-05:0"]  # never finished: still reported
    assert {(r["method"], r["lr"]) for r in result["rows"]} == {("qft", 2e-5), ("qft", 5e-5), ("fp32_lion", 2e-5)}
