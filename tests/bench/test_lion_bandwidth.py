"""bench/lion_bandwidth.py's code paths on the CPU (kernels interpreted, each timing one call): the GPU run
must not be the first to execute them. The speeds here mean nothing; the keys and byte counts do."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_the_sweep_and_the_int4_momentum_timings_run(monkeypatch):
    import triton.testing
    import lion_bandwidth as lb
    from qft_ds.ops import triton_backend
    if not triton_backend.is_compatible("cpu")[0]:
        pytest.skip("the triton interpreter is off (TRITON_INTERPRET)")
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode=None: (calls.append(fn()), 1.0)[1])
    graphed = []  # no CUDA graph on the CPU: each back-to-back timing runs its step once
    monkeypatch.setattr(lb, "graph_ms", lambda fn: (graphed.append(fn()), 2.0)[1])
    monkeypatch.setattr(lb, "SWEEP", lb.SWEEP[:1])
    bits = [k for k in lb.BITS_SWEEP if k["momentum_bits"] == 8 or (k["rand_bits"] == 8)]
    assert len(bits) == 5  # int8 momentum at 16, 32 and 8 bits and at 16 bits with 7 Philox rounds; int4 at 8
    monkeypatch.setattr(lb, "BITS_SWEEP", bits)
    vec = lb.M4_VEC_SWEEP
    assert [k["m4_vec"] for k in vec] == [False, True]  # paired: the byte-wise int4 kernel, then the byte-tile one
    monkeypatch.setattr(lb, "M4_VEC_SWEEP", vec)
    keep = [k for k in lb.KEEP_OUTLIERS_SWEEP if k["momentum_bits"] == 4]
    assert [k["keep_outliers"] for k in keep] == [False, True]
    monkeypatch.setattr(lb, "KEEP_OUTLIERS_SWEEP", keep)
    out = lb.bandwidths(torch.device("cpu"), n=4096 * 4, copy_numel=1024, bits_sweep=True)
    for key in ("lion_triton_ms", "lion_m4_ms", "lion_m4_outliers_ms", "lion_m4_frac_of_copy", "copy_gbs_end"):
        assert out[key] > 0, key
    assert out["lion_m4_bytes_per_param"] == pytest.approx(out["lion_bytes_per_param"] - 1)
    # the same time over fewer bytes: the int4 kernel's GB/s is int8's times 5/6 (bf16 gradient)
    assert out["lion_m4_gbs"] / out["lion_triton_gbs"] == pytest.approx(out["lion_m4_bytes_per_param"]
                                                                        / out["lion_bytes_per_param"], rel=1e-3)
    assert len(calls) == 2 + 2 + 2 + 1 + 1 + 2 + 5 + 2 + 2  # copies, sweep (bf16, fp32), outliers, int8, torch,
    # int4 (+ outliers), the bits sweep, the m4_vec pair, the keep_outliers pair
    assert [(r["m4_vec"], r["outliers"]) for r in out["lion_m4_vec_sweep"]] == [(False, 0.01), (True, 0.01)]
    assert [r["keep_outliers"] for r in out["lion_keep_outliers_sweep"]] == [False, True]
    assert sorted(out["lion_bits_best"]) == ["m4_bits8", "m8_bits16", "m8_bits16_rounds7", "m8_bits32", "m8_bits8"]
    assert len(graphed) == 5 + 2 + 2  # the same three sweeps' rows, timed back to back too
    for row in out["lion_bits_sweep"]:
        assert row["outliers"] == 0.01 and row["frac_of_copy"] == pytest.approx(row["gbs"] / out["copy_gbs"])
        assert row["ms_graph"] == 2.0 and row["frac_of_copy_graph"] == pytest.approx(row["frac_of_copy"] / 2)


def test_the_plot_draws_every_bits_row_of_a_real_result(tmp_path):
    """`--plot` on the committed H200 result: one bar per row of its bits sweep, each the row's share of
    the copy bandwidth, and a PNG written beside the (copied) result."""
    pytest.importorskip("matplotlib")
    import json
    import shutil
    import lion_bandwidth as lb
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    src = results / "lion_sweep_20261130-0728.json"
    result = json.loads(src.read_text())
    bars = lb.plot(result, tmp_path / "a.png", ceiling=0.88)
    assert [round(v, 6) for _, v in bars] == [round(r["gbs"] / result["copy_gbs"], 6) for r in result["lion_bits_sweep"]]
    assert bars[0][0].startswith("int8\n16 bits") and 0.6 < bars[0][1] < 0.75  # the default, int8: 68%
    assert (tmp_path / "a.png").stat().st_size > 10_000
    shutil.copy(src, tmp_path / "r.json")
    lb.main(["--plot", str(tmp_path / "r.json"), "--ceiling", str(results / "lion_ceiling_20261130-0728.json")])
    assert (tmp_path / "r.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="not a lion_bandwidth.py result"):
        (tmp_path / "x.json").write_text("{}")
        lb.main(["--plot", str(tmp_path / "x.json")])
