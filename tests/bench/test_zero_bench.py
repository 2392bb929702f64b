"""bench/zero.py end to end on the CPU (--cpu-smoke: gloo ranks, the tiny shape): a data-parallel run on 2
ranks records per-rank step and host times, every rank's profile, the collectives' payload, its overlap and all-reduce dtype, and the
discarded first run that warms the machine; --sample's host stacks; --batch."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_rank_data_parallel_run_records_its_variant(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "zero.py"), "--cpu-smoke", "--runs", "tiny:2:0", "--iters", "1",
           "--warmup", "1", "--overlap", "2", "--comm_dtype", "bf16", "--out", str(tmp_path),
           "--profile", str(tmp_path / "prof"), "--sample", "--batch", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("zero_2*.json")).read_text())
    row, = result["rows"]
    assert "error" not in row, row
    assert row["world_size"] == 2 and row["overlap"] == 2 and row["comm_dtype"] == "bf16" and row["batch"] == 3
    assert len(row["step_s_per_rank"]) == 2 and all(t > 0 for t in row["step_s_per_rank"])
    assert row["tok_s"] > 0 and row["comm_bytes_per_step"] > 0
    assert all(0 < h <= t for h, t in zip(row["host_s_per_rank"], row["step_s_per_rank"]))
    for threads in row["busy_threads_per_rank"]:  # each rank's busiest threads over the timed steps
        assert threads and all(t["core_frac"] >= 0 for t in threads)
        assert max(t["core_frac"] for t in threads) > 0.2  # the stepping thread itself
    for samples in row["host_samples_per_rank"]:  # --sample: where each rank's host time went
        assert samples["samples"] > 0 and 0 < samples["main_thread_cpu_frac"] <= 1.05
        shares = dict(samples["qft_ds"])
        assert 0 < sum(shares.values()) and any(k.endswith(" backward") or "comm.py" in k for k in shares), shares
    for rank in (0, 1):  # --profile: every rank's trace and its per-step reading
        name = f"tiny_x2_z0_rank{rank}"
        assert (tmp_path / "prof" / f"trace_{name}.json.gz").stat().st_size > 0
        steps = json.loads((tmp_path / "prof" / f"timeline_{name}.json").read_text())
        assert len(steps) == 2 and all(s["step_ms"] > 0 for s in steps)
    assert result["warm_machine_run"]["world_size"] == 2 and "error" not in result["warm_machine_run"]
