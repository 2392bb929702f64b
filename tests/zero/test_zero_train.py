"""train.py at ZeRO stage 3 on 2 gloo ranks, stopped and resumed on 1 rank with the same global batch
(2 ranks x 2 sequences -> 1 rank x 4): the sharded checkpoint carries the run on fewer processes.

One spawn runs an uninterrupted 2-rank run and one stopped after step 2. Exact: the resumed run restores
the int8 state the 2-rank run ended with (its held-out loss, evaluated again on 1 rank), and follows the
same LR schedule and data position. Close: its last steps against the uninterrupted run, whose gradients
were reduced over 2 ranks in another float order (tests/zero/test_zero_sharding.py bounds that).
"""
import json
import sys
from pathlib import Path

import pytest

import harness as H

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

STEPS, STOP = 4, 2


def write_model_and_corpus(tmp: Path) -> Path:
    """A tiny LLaMA and its word tokenizer in tmp/model; returns the path of a small text corpus."""
    from conftest import WORDS, make_tiny_llama, make_word_tokenizer
    make_tiny_llama(vocab=len(WORDS) + 2).save_pretrained(tmp / "model")
    make_word_tokenizer().save_pretrained(tmp / "model")
    text = tmp / "corpus.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(40)) for i in range(60)))
    return text


def _config(tmp: Path, micro: int) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "qft_zero3.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, bf16={"enabled": False})
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=1, warmup_min_ratio=0.5)
    path = tmp / f"zero3-micro{micro}.json"
    path.write_text(json.dumps(cfg))
    return path


def _argv(cfg, model, text, out, *extra):
    return ["--deepspeed", str(cfg), "--model", str(model), "--dataset", str(text), "--output_dir", str(out),
            "--seq_len", "16", "--eval_blocks", "2", "--max_steps", str(STEPS), *extra]


def _worker(rank, world, cfg, model, text, out):
    train.main(_argv(cfg, model, text, f"{out}/straight"))
    train.main(_argv(cfg, model, text, f"{out}/split", "--stop_at", str(STOP)))


def _rows(out: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3train")
    text = write_model_and_corpus(tmp)
    H.spawn(_worker, str(_config(tmp, 2)), str(tmp / "model"), str(text), str(tmp))
    split = tmp / "split"
    session = _summary(split)  # the stopped 2-rank session's (evaluated at step STOP)
    train.main(_argv(_config(tmp, 4), tmp / "model", text, tmp / "ignored", "--resume_from_checkpoint", str(split),
                     "--output_dir", str(split)))
    return tmp, session


def test_two_ranks_write_a_sharded_checkpoint(runs):
    tmp, _ = runs
    ckpt = tmp / "split" / f"checkpoint-{STOP}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["zero"]["world_size"] == 2 and meta["zero"]["stage"] == 3
    assert sorted(p.name for p in (ckpt / "zero").iterdir()) == ["rank-00000.safetensors", "rank-00001.safetensors"]


def test_one_rank_resumes_the_same_state_schedule_and_data(runs):
    tmp, session = runs
    straight, split = _rows(tmp / "straight"), _rows(tmp / "split")
    assert sorted(split) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # the same schedule and data position: exact
        assert (split[step]["lr"], split[step]["tokens"]) == (straight[step]["lr"], straight[step]["tokens"])
        assert split[step]["lr"] > 0 or step == 1  # the weights move before the checkpoint too (DeepSpeed's
        # WarmupCosineLR gives step 1 lr 0)
    for step in range(1, STOP + 1):  # the 2-rank session itself is the uninterrupted run's
        assert split[step]["loss"] == straight[step]["loss"]
    resumed = _summary(tmp / "split")
    # the held-out loss of the restored weights on 1 rank is the 2-rank session's at its end (only the
    # evaluation's batch of 4 instead of 2 differs)
    assert resumed["eval_start"] == pytest.approx(session["eval_end"], rel=1e-5)
    assert resumed["tokens"] == _summary(tmp / "straight")["tokens"]
    assert resumed["eval_end"] == pytest.approx(_summary(tmp / "straight")["eval_end"], rel=1e-3)
