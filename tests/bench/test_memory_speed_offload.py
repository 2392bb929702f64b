"""bench/memory_speed.py's qft_m4_chunked_offload on the tiny CPU shape: qft_m4_chunked plus DeepSpeed's
"activation_checkpointing": {"cpu_checkpointing": true}, which reaches the engine and offloads."""
import json
import sys
from pathlib import Path

import qft_ds
import qft_ds.nn.offload as offload

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import memory_speed  # noqa: E402


def test_offload_variant_runs_and_offloads(tmp_path, monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny shape's hidden states are far under 1 MiB
    engines = []
    real = qft_ds.initialize

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        engines.append(out[0])
        return out

    monkeypatch.setattr(qft_ds, "initialize", spy)
    path = memory_speed.main(["--shapes", "tiny", "--skip-bandwidth", "--methods", "qft_m4_chunked",
                              "qft_m4_chunked_offload", "--chunk", "32", "--warmup", "1", "--iters", "1",
                              "--out", str(tmp_path)])
    plain, offloaded = json.loads(path.read_text())["rows"]
    assert plain["status"] == offloaded["status"] == "ok" and offloaded["tok_s"] > 0
    assert offloaded["method"] == "qft_m4_chunked_offload"
    assert offloaded["cpu_checkpointing"] and not plain["cpu_checkpointing"]
    assert offloaded["qft"] == plain["qft"]  # the same qft section: int4 momentum, chunked loss
    assert offloaded["momentum_bits"] == 4 and offloaded["qft"]["chunked_loss"] == 32
    assert offloaded["state_bytes_per_param"] == plain["state_bytes_per_param"]  # host copies are not state
    assert len(engines) == 2 and not hasattr(engines[0].module, "qft_host_offload")
    assert engines[1].module.qft_host_offload.offloaded_bytes > 0
