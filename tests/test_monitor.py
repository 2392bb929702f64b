"""Monitoring: DeepSpeed's CSV monitor gets qft_ds's per-step numbers; `qft_ds plot` draws metrics.jsonl."""
import json
import sys
from pathlib import Path


from qft_ds.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_csv_monitor_and_plot(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=5, warmup_num_steps=1)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "qft"}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    train.main(["--deepspeed", str(tmp_path / "c.json"), "--model", str(tiny_model_dir), "--dataset",
                str(tiny_text_file), "--output_dir", str(out), "--seq_len", "16", "--eval_blocks", "2",
                "--no-save_final"])
    files = {p.name: p for p in (tmp_path / "csv").rglob("*.csv")}
    for name in ("loss", "lr", "tokens_per_s", "peak_memory_gib", "skipped_steps", "partial_steps"):
        f = next(p for n, p in files.items() if n.endswith(f"{name}.csv"))
        lines = f.read_text().splitlines()
        assert len(lines) == 1 + 5, (name, lines)  # a header and one row per step
    assert not (out / "latest").exists()  # --no-save_final
    assert main(["plot", str(out)]) == 0
    png = out / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
