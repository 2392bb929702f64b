"""What train.py says before its first step: a stamped line per phase, and which data it holds out."""
import json
import re
import sys
from pathlib import Path

import pytest

from qft_ds import startup, textdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_train_py_says_each_phase_with_its_time_and_the_heldout_slice(tiny_model_dir, tiny_text_file, tmp_path,
                                                                     monkeypatch, capsys):
    import train
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=2, warmup_num_steps=1)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    train.main(["--deepspeed", str(tmp_path / "c.json"), "--model", str(tiny_model_dir), "--dataset",
                str(tiny_text_file), "--output_dir", str(tmp_path / "run"), "--seq_len", "16", "--eval_blocks", "2",
                "--no-save_final"])
    out = capsys.readouterr().out
    stamped = re.findall(r"^\[\s*([\d.]+) s\] (.*)$", out, re.M)
    phases = [what.split(" ")[0] for _, what in stamped]
    assert phases == ["loading", "reading", "setting", "measuring", "training"], stamped
    times = [float(t) for t, _ in stamped]
    assert times == sorted(times)
    assert out.index("training from step 1") < out.index("held-out loss:")  # all before the first step's end
    held = next(line for line in out.splitlines() if line.startswith("held-out: "))
    # 60 paragraphs: the last 5% are 3, none trained on, and the loss reads 2 blocks of 16 tokens
    assert "the last 5% of" in held and "[-3 paragraphs:]" in held and "2 blocks x 16 tokens" in held
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["start_step"] == 0


def test_clock_is_silent_off_rank_0(capsys):
    startup.StartupClock(enabled=False).say("loading")
    assert capsys.readouterr().out == ""


def test_jsonl_rows_folder_and_dataset_split_are_named(tmp_path):
    rows = tmp_path / "d.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} words here"}) + "\n" for i in range(40)))
    line = startup.text_heldout(textdata.load_text_source(str(rows)), 2, 8)
    assert "the last 5% of" in line and "2 of 40 rows (d.jsonl#39, d.jsonl#40)" in line and "8 words" in line
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text(f"text of {name}")
    assert "1 of 3 documents of" in startup.text_heldout(textdata.load_text_source(str(folder)), 1, 8)
    split = textdata.TextSplits(["a", "b"], ["c"], ["ds:train"], ["ds:validation"], source="ds")
    assert "the split ds:validation (1 rows)" in startup.text_heldout(split, 1, 8)


@pytest.mark.parametrize("eval_dataset", [None, "eval.jsonl"])
def test_instruction_heldout_counts_rows_and_answer_tokens(eval_dataset):
    held = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5])]
    line = startup.sft_heldout("d.jsonl", eval_dataset, 38, 2, held)
    assert "3 answer tokens" in line
    assert ("--eval_dataset eval.jsonl: 2 rows" if eval_dataset else "rows 39-40 of 40") in line
    assert "1 scored" in startup.sft_heldout("d.jsonl", None, 38, 2, held[:1])
