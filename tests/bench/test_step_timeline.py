"""The step-timeline analysis reads GPU busy time, idle gaps and host waits off a profiler trace."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_timeline  # noqa: E402


def ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_busy_idle_gaps_and_waits():
    trace = {"traceEvents": [
        ev("user_annotation", "timeline_step_0", 0, 1000),
        ev("kernel", "a", 100, 200), ev("kernel", "b", 250, 50),    # overlapping: busy 100..300
        ev("kernel", "c", 350, 50), ev("gpu_memcpy", "d", 800, 100),
        ev("cpu_op", "autograd::engine::evaluate_function: X", 380, 500),
        ev("cpu_op", "aten::mul", 390, 20),
        ev("cuda_runtime", "cudaStreamSynchronize", 900, 100),
        ev("cuda_runtime", "cudaLaunchKernel", 300, 5),
        ev("kernel", "next step", 1200, 50),                           # outside the step: not counted
        {"ph": "i", "cat": "cpu_instant_event", "name": "marker", "ts": 10},
    ]}
    (s,) = step_timeline.analyse(trace, min_gap_us=150)
    assert s["step_ms"] == 1.0 and s["kernels"] == 4
    assert s["gpu_busy_ms"] == 0.35 and s["gpu_idle_ms"] == 0.65
    assert s["idle_in_gaps_over_min_ms"] == 0.4           # only 400..800 is a gap of >= 150 us
    assert s["host_wait_ms"] == 0.1 and s["host_waits"] == 1
    (gap,) = s["largest_gaps"]
    assert gap == {"at_ms": 0.4, "ms": 0.4, "outer_op": "autograd::engine::evaluate_function: X",
                   "inner_op": "aten::mul"}
    assert s["idle_by_outer_op_ms"] == {"autograd::engine::evaluate_function: X": 0.4}


def test_union_merges_overlaps():
    assert step_timeline._union([(5, 6), (0, 2), (1, 3)]) == [[0, 3], [5, 6]]
