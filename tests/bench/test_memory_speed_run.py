"""bench/memory_speed.py end to end on the CPU with the tiny shape: the new methods (int4 momentum, chunked
loss) run through qft_ds.initialize and record their settings and state bytes, an out-of-memory method is
recorded and the next one still runs, and the size plot merges several results."""
import json
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import memory_plot  # noqa: E402
import memory_speed  # noqa: E402
from shapes import SHAPES, BuildProgress, shape_sizes  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"method", "model", "batch", "seq", "status", "params", "peak_gib", "peak_reserved_gib", "setup_peak_gib",
            "setup_peak_reserved_gib", "setup_s", "build_s", "tok_s", "step_s", "state_bytes_per_param", "oom"}


def run(out, methods, *extra):
    path = memory_speed.main(["--shapes", "tiny", "--skip-bandwidth", "--methods", *methods, "--chunk", "32",
                              "--warmup", "1", "--iters", "1", "--out", str(out), *extra])
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("tiny"), ["qft", "qft_m4", "qft_m4_chunked", "bf16_adamw"])


def test_tiny_shape_runs_every_new_method(tiny_run):
    path, result = tiny_run
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["qft", "qft_m4", "qft_m4_chunked", "bf16_adamw"]
    params = shape_sizes("tiny")["params"]
    for r in rows.values():
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["status"] == "ok" and not r["oom"] and r["tok_s"] > 0 and r["setup_s"] >= r["build_s"] > 0
        assert (r["batch"], r["seq"]) == (SHAPES["tiny"]["batch"], SHAPES["tiny"]["seq"])
        assert r["params"] == params  # the model built has the shape's parameter count
        assert r["peak_gib"] is None  # no CUDA: memory is not measured, never a made-up figure
    assert rows["qft"]["qft"]["momentum_bits"] == 8 and rows["qft"]["qft"]["chunked_loss"] == 0
    assert rows["qft_m4"]["momentum_bits"] == 4 and rows["qft_m4"]["qft"]["chunked_loss"] == 0
    assert rows["qft_m4_chunked"]["momentum_bits"] == 4 and rows["qft_m4_chunked"]["qft"]["chunked_loss"] == 32
    # int4 momentum: two codes per byte, so half a byte less per quantized parameter (the block scales stay)
    saved = rows["qft"]["state_bytes_per_param"] - rows["qft_m4"]["state_bytes_per_param"]
    quantized = rows["qft"]["quantized_params"] / rows["qft"]["params"]
    assert 0.45 < saved and saved == pytest.approx(0.5 * quantized, abs=2e-4)
    assert rows["qft_m4_chunked"]["state_bytes_per_param"] == rows["qft_m4"]["state_bytes_per_param"]
    assert rows["bf16_adamw"]["state_bytes_per_param"] > rows["qft"]["state_bytes_per_param"]
    for png in (path.with_suffix(".png"), path.with_name(path.stem + "_size.png")):
        assert png.read_bytes()[:8] == PNG


def test_out_of_memory_is_recorded_and_the_next_method_runs(tmp_path, monkeypatch):
    real_setup = memory_speed.setup
    held = {}

    def setup(method, *args):
        if "step" in held:  # the next method's setup: the failed one's model must be gone by now
            held["alive_at_next_setup"] = held["step"]() is not None
        step, state = real_setup(method, *args)
        if method != "qft_m4":
            return step, state
        held["step"] = weakref.ref(step)  # the model and engine live in its closure

        def out_of_memory(x):
            step(x)  # a real step first: activations and the update's state exist when it fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
        return out_of_memory, state

    monkeypatch.setattr(memory_speed, "setup", setup)
    _, result = run(tmp_path, ["qft_m4", "bf16_adamw"], "--batch", "1", "--seq", "32")
    oom, after = result["rows"]
    assert oom["method"] == "qft_m4" and oom["status"] == "oom" and oom["oom"] and oom["oom_phase"] == "train"
    assert oom["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert oom["tok_s"] is None and oom["peak_gib"] is None and oom["setup_s"] > 0
    assert held["alive_at_next_setup"] is False  # nothing kept the failed model alive into the next method
    assert after["method"] == "bf16_adamw" and after["status"] == "ok" and after["tok_s"] > 0
    assert (after["batch"], after["seq"]) == (1, 32)  # the --batch/--seq overrides


def test_plot_merges_results(tiny_run, tmp_path):
    path, result = tiny_run
    _, other = run(tmp_path, ["qft"], "--batch", "1", "--seq", "32")
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    merged = memory_plot.merge([path, other_path])
    assert len(merged["rows"]) == len(result["rows"]) + 1 and merged["sources"] == [path.name, "other.json"]
    assert {(r["method"], r["seq"]) for r in merged["rows"]} >= {("qft", 64), ("qft", 32)}
    assert len(memory_plot.merge([path, path])["rows"]) == len(result["rows"])  # same runs replace, not repeat
    png = memory_speed.main(["--plot", str(path), str(other_path), "--out", str(tmp_path / "plots")])
    assert png.parent == tmp_path / "plots" and png.read_bytes()[:8] == PNG


def test_size_plot_reads_the_committed_gpu_results(tmp_path):
    """Results written before the "status" key (an OOM row carried only "oom") still plot; every row with a
    measured peak or an OOM is drawn."""
    paths = sorted((BENCH / "results").glob("memory_speed_2026*.json"))
    assert paths, "no committed memory_speed results"
    merged = memory_plot.merge(paths)
    left_out = memory_plot.plot_size(merged, tmp_path / "size.png")
    assert (tmp_path / "size.png").read_bytes()[:8] == PNG
    drawn = [r for r in merged["rows"] if r.get("params") and memory_plot.status(r) in ("ok", "oom")
             and (memory_plot.status(r) == "oom" or r.get("peak_gib") is not None)]
    assert len(drawn) + len(left_out) == len(merged["rows"])
    assert any(memory_plot.status(r) == "oom" for r in drawn)  # FusedAdam ran out at 7B (H100)


def test_a_cuda_library_allocation_failure_counts_as_out_of_memory():
    assert memory_speed.is_oom(torch.OutOfMemoryError("CUDA out of memory."))
    assert memory_speed.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not memory_speed.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not memory_speed.is_oom(ValueError("out of memory"))


def test_build_progress_says_every_tenth_of_the_elements():
    lines = []
    progress = BuildProgress(total_elements=20 * 50, log=lines.append)
    for _ in range(20):
        progress(SimpleNamespace(numel=50, shape=(5, 10)))
    assert len(lines) == 10 and "(10%" in lines[0] and "(100%" in lines[-1]
    assert lines[-1].startswith("    built 20 weights")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU guard")
def test_without_cuda_only_the_tiny_shape_runs():
    with pytest.raises(SystemExit):
        memory_speed.main(["--shapes", "7b", "--skip-bandwidth", "--methods", "qft"])
