"""The QA fidelity benchmark: the Shakespeare task builder (deterministic, no prompt in two splits, short
answers), the committed task files, the harness end to end on a tiny model, and the lr selection of --merge."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import qa_fidelity  # noqa: E402
import qa_task  # noqa: E402

SMOLLM2_TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_tokenizer"

HAMLET_LIKE = """THE TRAGEDY OF TEST

PERSONS REPRESENTED.

Hamlet, Prince of Denmark.
Horatio, Friend to Hamlet.

ACT I.

Scene I. Elsinore.

[Enter Hamlet and Horatio.]

Ham.
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer

Hor.
My lord, I came to see your father's funeral.

Ham.
I pray thee, do not mock me, fellow-student; [Aside.]
I think it was to see my mother's wedding.

[Exit Horatio.]

Thus conscience does make cowards of us all; a speech going on after a stage direction.

Hor.
Indeed, my lord, it followed hard upon.

Ham.
Thrift, thrift, Horatio! the funeral bak'd meats

Hor.
Where, my lord, where did you see him last night?
"""

CAPITALS_LIKE = """ACT I.

SCENE I. A street.

KING.
Welcome to the court of the king, my friends all.

SECOND LORD.

We thank your grace for this most royal welcome here.

QUEEN. O, content thee, husband, and be merry now.
"""


def test_parse_play_labels_abbreviations_and_layouts():
    speeches = qa_task.parse_play(HAMLET_LIKE)
    assert [s for s, _ in speeches] == ["Hamlet", "Horatio", "Hamlet", "Horatio", "Hamlet", "Horatio"]
    # stage directions are cut out; the unlabelled paragraph after [Exit Horatio.] is left out
    assert speeches[2][1] == ["I pray thee, do not mock me, fellow-student;",
                              "I think it was to see my mother's wedding."]
    assert not any("conscience" in line for _, lines in speeches for line in lines)
    caps = qa_task.parse_play(CAPITALS_LIKE)
    assert caps == [("King", ["Welcome to the court of the king, my friends all."]),
                    ("Second Lord", ["We thank your grace for this most royal welcome here."]),
                    ("Queen", ["O, content thee, husband, and be merry now."])]
    assert [qa_task.speaker_answer(s) for s in ("King", "Second Lord", "Lady Macbeth", "Mrs. Page", "Duke Senior",
                                                "Lucius' Servant")] == [None, None, "Lady Macbeth", "Mrs. Page",
                                                                        None, None]


def test_snippets_do_not_overlap_and_respect_lengths():
    lines = ["Ay, my lord.", "I will attend your lordship to the gate and back again,", "and more",
             "a b c d e f g h i j k l m n o p q r s t u v w x y z aa bb cc dd ee ff"]
    assert qa_task.snippets(lines) == ["Ay, my lord. I will attend your lordship to the gate and back again,"]


def _synthetic_plays():
    """Three plays of 150 speeches each: two named speakers and a role (KING) per play, random words."""
    rng = random.Random(0)
    words = "love death crown sword night king blood heaven fair foul sweet honour grief fool lord".split()
    plays = {}
    for name, who in (("hamlet", ["Hamlet", "Horatio"]), ("macbeth", ["Macbeth", "Banquo"]),
                      ("lear", ["Lear", "Kent"])):
        labels = [*who, "King"]
        plays[name] = [(labels[i % 3], [" ".join(rng.choice(words) for _ in range(8)) for _ in range(3)])
                       for i in range(150)]
    return plays


@pytest.mark.parametrize("task", qa_task.TASKS)
def test_build_task_deterministic_disjoint_short(task):
    plays = _synthetic_plays()
    kw = dict(n_train=200, n_val=40, n_test=40)
    a, b = qa_task.build_task(task, plays, seed=0, **kw), qa_task.build_task(task, plays, seed=0, **kw)
    assert a == b
    assert qa_task.build_task(task, plays, seed=1, **kw) != a
    assert {k: len(v) for k, v in a.items()} == {"train": 200, "validation": 40, "test": 40}
    prompts = {k: [r["prompt"] for r in v] for k, v in a.items()}
    assert sum(len(set(v)) for v in prompts.values()) == len(set().union(*prompts.values())) == 280
    answers = {r["completion"] for rows in a.values() for r in rows}
    if task == "play":
        assert answers == {" Hamlet", " Macbeth", " King Lear"}
    else:
        assert answers == {" Hamlet", " Horatio", " Macbeth", " Banquo", " Lear", " Kent"}  # no role: King
    for rows in a.values():
        for r in rows:
            assert r["prompt"].startswith(qa_task.QUESTION[task] + '\n"') and r["prompt"].endswith('"\nAnswer:')
            assert r["completion"].startswith(" ") and 1 <= len(r["completion"].split()) <= 3


def _rows(task, split):
    return [json.loads(line) for line in qa_task.split_path(task, split).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", qa_task.TASKS)
def test_committed_task_files(task):
    splits = {s: _rows(task, s) for s in qa_task.SPLITS}
    assert {s: len(v) for s, v in splits.items()} == {"train": 8000, "validation": 500, "test": 500}
    prompts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, so none in two splits
    man = json.loads((qa_task.DATA_DIR / f"{task}_manifest.json").read_text())
    for s, rows in splits.items():
        assert man["sha256"][s] == hashlib.sha256(qa_task.dumps(rows).encode()).hexdigest()
        assert all(set(r) == {"prompt", "completion"} and r["prompt"].endswith("\nAnswer:")
                   and r["completion"].startswith(" ") and r["completion"] == r["completion"].rstrip() for r in rows)
    assert man["answers"] == (34 if task == "play" else 100)
    assert max(man["answer_tokens"].values()) <= (5 if task == "play" else 3)
    assert sum(p.stat().st_size for p in qa_task.DATA_DIR.glob("*")) < 3 * 2**20
    if SMOLLM2_TOKENIZER.is_dir():  # the recorded token counts are SmolLM2's
        count = qa_task.smollm2_token_counter(str(SMOLLM2_TOKENIZER))
        assert {a: count(a) for a in man["answer_tokens"]} == man["answer_tokens"]


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("QFT_DS_NETWORK_TESTS") != "1", reason="set QFT_DS_NETWORK_TESTS=1")
def test_rebuild_from_the_corpus_matches_the_committed_files():
    assert qa_task.main(["--check", "--model", str(SMOLLM2_TOKENIZER)]) == 0


def test_full_grid_and_balanced_parts():
    runs = qa_fidelity.full_grid()
    n_grid = sum(len(g) for g in qa_fidelity.DEFAULT_GRID.values())
    assert len(runs) == len(set(runs)) == n_grid and {r.rsplit(":", 1)[1] for r in runs} == {"0"}
    assert {r.split(":")[0] for r in runs} == set(qa_fidelity.METHODS)
    assert [r for r in runs if r.startswith("qft_ef:")] == [r.replace("qft:", "qft_ef:") for r in runs
                                                            if r.startswith("qft:")]  # qft's lr grid
    parts = [qa_fidelity.part(runs, f"{i}/10") for i in range(10)]
    assert sorted(r for p in parts for r in p) == sorted(runs)
    cost = [sum(qa_fidelity.COST[r.split(":")[0]] for r in p) for p in parts]
    ideal = sum(cost) / 10
    assert max(cost) <= 1.2 * ideal and all(p for p in parts)  # every part ends at about the same time
    assert qa_fidelity.part(runs, "3/10") == parts[3]  # deterministic
    with pytest.raises(SystemExit):
        qa_fidelity.part(runs, "10/10")
    assert subprocess.run(["bash", "-n", str(BENCH / "qa_grid.sh")]).returncode == 0


def test_at_chosen_runs_second_seeds(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"chosen": [{"method": "qft", "chosen_lr": 2e-5}, {"method": "fp32_lion",
                                                                                 "chosen_lr": 5e-5},
                                           {"method": "qft_ef", "chosen_lr": 1e-4},
                                           {"method": "qft_m4", "chosen_lr": 5e-5}]}))
    assert qa_fidelity.at_chosen(path) == ["qft:2e-05:1", "qft_ef:0.0001:1", "qft_m4:5e-05:1", "fp32_lion:5e-05:1"]
    path.write_text(json.dumps({"chosen": [{"method": "qft", "chosen_lr": 2e-5}]}))
    with pytest.raises(SystemExit, match="fp32_lion"):
        qa_fidelity.at_chosen(path)


def test_methods_limit_the_grid_and_the_second_seeds(tmp_path, capsys):
    """--methods qft qft_ef (bench/qa_grid.sh's EXTRA): only their grids and second seeds; a part with no run
    (more processes than runs) does nothing and succeeds."""
    runs = qa_fidelity.full_grid(["qft", "qft_ef"])
    assert runs == [f"{m}:{lr:g}:0" for m in ("qft", "qft_ef") for lr in qa_fidelity.DEFAULT_GRID["qft"]]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"chosen": [{"method": "qft", "chosen_lr": 2e-5},
                                           {"method": "qft_ef", "chosen_lr": 5e-5}]}))
    assert qa_fidelity.main(["--at_chosen", str(path), "--methods", "qft", "qft_ef", "--part", "2/3"]) is None
    assert "no runs in this part" in capsys.readouterr().out
    # one part more than the runs: the last is empty (a fixed "9/10" ran a real training once the grid had 10 runs)
    assert qa_fidelity.main(["--grid", "--methods", "qft", "qft_ef", "--part", f"{len(runs)}/{len(runs) + 1}"]) is None
    with pytest.raises(SystemExit):
        qa_fidelity.main(["--grid", "--methods", "nope"])


def _row(method, lr, seed, val, test, val_em, test_em):
    return {"method": method, "lr": lr, "seed": seed, "val_start": 9.0, "val_end": val, "val_em": val_em,
            "eval_start": 9.0, "eval_end": test, "test_em": test_em, "val_curve": [(0, 9.0), (300, val)],
            "eval_curve": [(0, 9.0), (300, test)], "peak_gib": 1.0, "tok_s": 1000.0, "gpu_shared_by": 10}


def _part(tmp_path, name, rows, **setup):
    path = tmp_path / name
    base = {"model": "m", "task": "play", "data_sha256": "x", "steps": 300, "warmup": 20, "bsz": 32,
            "max_len": 128, "val_rows": 500, "test_rows": 500}
    path.write_text(json.dumps({"device": "d", "commit": "c", "setup": {**base, **setup}, "rows": rows}))
    return str(path)


def test_merge_selects_on_seed_0_validation_and_reports_the_seed_mean(tmp_path):
    # qft: seed 0 picks 2e-5 (val 0.55 < 0.60); its second seed is worse (mean 0.675), but cannot move the
    # choice; 5e-5 has the best test loss, which never counts
    a = _part(tmp_path, "a.json", [_row("qft", 1e-5, 0, 0.60, 0.70, 0.6, 0.60),
                                   _row("qft", 5e-5, 0, 0.70, 0.50, 0.6, 0.80),
                                   _row("fp32_lion", 2e-5, 0, 0.60, 0.65, 0.7, 0.68)])
    b = _part(tmp_path, "b.json", [_row("qft", 2e-5, 0, 0.55, 0.70, 0.7, 0.60),
                                   _row("fp32_lion", 1e-5, 0, 0.70, 0.60, 0.6, 0.70),
                                   _row("fp32_adamw", 1e-4, 0, 0.55, 0.62, 0.7, 0.71)])
    c = _part(tmp_path, "c.json", [_row("qft", 2e-5, 1, 0.80, 0.72, 0.5, 0.62)])
    path = qa_fidelity.main(["--merge", a, b, c, "--out", str(tmp_path / "out")])
    result = json.loads(path.read_text())
    assert path.name.startswith("qa_fidelity_play_") and path.with_suffix(".png").is_file()
    chosen = {s["method"]: s for s in result["chosen"]}
    assert chosen["qft"]["chosen_lr"] == 2e-5 and chosen["qft"]["seeds"] == [0, 1] and not chosen["qft"]["at_grid_edge"]
    assert chosen["qft"]["eval_end"] == pytest.approx(0.71) and chosen["qft"]["test_em"] == pytest.approx(0.61)
    assert chosen["qft"]["val_by_lr"] == {"1e-05": 0.60, "2e-05": 0.55, "5e-05": 0.70}
    assert chosen["fp32_lion"]["chosen_lr"] == 2e-5
    gap = result["comparison"]["vs_fp32_lion"]["qft"]
    assert gap["loss_rel"] == pytest.approx(0.71 / 0.65 - 1) and gap["em_points"] == pytest.approx(-7.0)
    assert result["comparison"]["qft_meets_target"]["met"] is False
    assert [(r["lr"], r["seed"], r["chosen"]) for r in result["rows"] if r["method"] == "qft"] == [
        (1e-5, 0, False), (2e-5, 0, True), (2e-5, 1, True), (5e-5, 0, False)]
    d = _part(tmp_path, "d.json", [_row("peqa", 1e-4, 0, 0.7, 0.7, 0.6, 0.6)], task="speaker")
    with pytest.raises(SystemExit, match="task"):
        qa_fidelity.main(["--merge", a, d, "--out", str(tmp_path / "out")])


def _tiny_task(tmp_path, sizes=(("train", 64), ("validation", 8), ("test", 8))):
    """The committed play task's first rows: a small copy for a quick run."""
    data = tmp_path / "qa"
    data.mkdir()
    for split, n in sizes:
        lines = qa_task.split_path("play", split).read_text(encoding="utf-8").splitlines(True)[:n]
        qa_task.split_path("play", split, data).write_text("".join(lines), encoding="utf-8")
    return data


def test_harness_runs_qft_and_fp32_lion_end_to_end(tmp_path, tiny_model_dir):
    data = _tiny_task(tmp_path)
    path = qa_fidelity.main(["--task", "play", "--data_dir", str(data), "--model", str(tiny_model_dir),
                             "--runs", "qft:1e-3:0", "fp32_lion:1e-3:0", "--steps", "2", "--warmup", "1",
                             "--bsz", "4", "--eval_every", "1", "--eval_bsz", "4", "--commit", "abc123",
                             "--out", str(tmp_path / "out")])
    result = json.loads(path.read_text())
    assert result["commit"] == "abc123" and result["setup"]["task"] == "play"
    assert result["setup"]["steps"] == 2 and result["setup"]["bsz"] == 4 and result["setup"]["test_rows"] == 8
    assert [(r["method"], r["seed"]) for r in result["rows"]] == [("qft", 0), ("fp32_lion", 0)]
    for r in result["rows"]:
        assert r["val_end"] > 0 and r["eval_end"] > 0 and 0 <= r["val_em"] <= 1 and 0 <= r["test_em"] <= 1
        assert [s for s, _ in r["eval_curve"]] == [0, 1, 2] and r["tok_s"] > 0
    assert {s["method"] for s in result["chosen"]} == {"qft", "fp32_lion"} and result["failed"] == []
    assert "vs_fp32_lion" in result["comparison"] and path.with_suffix(".png").is_file()


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, tiny_model_dir, monkeypatch):
    def fake_run(spec, *args):
        if spec.startswith("qft:"):
            raise RuntimeError("boom")
        method, lr, seed = spec.split(":")
        return _row(method, float(lr), int(seed), 0.5, 0.6, 0.5, 0.5)
    monkeypatch.setattr(qa_fidelity, "run_one", fake_run)
    path = qa_fidelity.main(["--data_dir", str(_tiny_task(tmp_path)), "--model", str(tiny_model_dir), "--runs",
                             "qft:1e-3:0", "fp32_lion:1e-3:0", "--out", str(tmp_path / "out")])
    result = json.loads(path.read_text())
    assert [r["method"] for r in result["rows"]] == ["fp32_lion"]
    assert result["failed"] == [{"run": "qft:1e-3:0", "error": "RuntimeError: boom"}]
    merged = json.loads(qa_fidelity.main(["--merge", str(path), "--out", str(tmp_path / "m")]).read_text())
    assert merged["failed"] == result["failed"]


def test_harness_runs_qft_ef_one_step(tmp_path, tiny_model_dir):
    """qft_ef ("rounding": "ef", bench/fidelity.py's config) trains a step on the tiny model: its weights carry
    the error-feedback residual, one more byte per parameter than qft."""
    data = _tiny_task(tmp_path, (("train", 16), ("validation", 4), ("test", 4)))
    common = ["--task", "play", "--data_dir", str(data), "--model", str(tiny_model_dir), "--steps", "1",
              "--warmup", "1", "--bsz", "4", "--eval_every", "1", "--eval_bsz", "4", "--out", str(tmp_path / "out")]
    result = json.loads(qa_fidelity.main([*common, "--runs", "qft_ef:1e-3:0", "qft:1e-3:0"]).read_text())
    sr, ef = result["rows"]  # in METHODS order
    assert (sr["method"], ef["method"]) == ("qft", "qft_ef") and result["failed"] == []
    assert [s for s, _ in ef["eval_curve"]] == [0, 1] and ef["val_end"] > 0 and ef["train_loss_first"] > 0
    assert ef["state_bytes_per_param"] == pytest.approx(sr["state_bytes_per_param"] + 1, abs=0.05)


def test_fidelity_run_one_still_runs_on_the_shared_trainer(tiny_llama):
    """bench/fidelity.py's runs go through the same build_trainer and train_loop as the QA harness."""
    import argparse

    import torch
    import fidelity
    args = argparse.Namespace(bsz=2, steps=2, warmup=1, seq=16, eval_every=1, gpu_shared_by=1)
    blocks = torch.randint(0, 128, (8, 16))
    for spec in ("qft:1e-3:0", "fp32_lion:1e-3:0"):
        row = fidelity.run_one(spec, tiny_llama(), blocks, blocks[:2], blocks[2:4], args)
        assert [s for s, _ in row["eval_curve"]] == [0, 1, 2] and row["tok_s"] > 0 and row["eval_end"] > 0
        assert ("state_bytes_per_param" in row) == spec.startswith("qft")
