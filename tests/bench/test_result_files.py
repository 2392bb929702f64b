"""bench/common.write_result: two results of one name written in the same minute (one device command's
runs) both survive; the second gets a numbered name."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402


def test_same_minute_results_both_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: "20261130-0205")
    first = common.write_result("memory_speed", {"shape": "7b"}, tmp_path)
    second = common.write_result("memory_speed", {"shape": "llama3-8b"}, tmp_path)
    assert first.name == "memory_speed_20261130-0205.json"
    assert second.name == "memory_speed_20261130-0205-2.json"
    assert json.loads(first.read_text()) == {"shape": "7b"}
    assert json.loads(second.read_text()) == {"shape": "llama3-8b"}
    assert not list(tmp_path.glob("*.tmp"))
