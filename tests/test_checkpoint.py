"""Checkpoints: exact resume through train.py, atomic saves, clear errors, interrupts."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from qft_ds import checkpoint, checkpoint_io, textdata
from qft_ds.checkpoint import CheckpointError, state_hash

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from checkpoint_attacks import one_step, small_engine  # noqa: E402


def write_config(tmp_path, total=8, **top):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"]["params"].update(total_num_steps=total, warmup_num_steps=2)
    cfg.update(top)
    path = tmp_path / f"qft-{len(list(tmp_path.glob('qft-*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_train(cfg, model_dir, text, out, *extra):
    train.main(["--deepspeed", str(cfg), "--model", str(model_dir), "--dataset", str(text), "--output_dir",
                str(out), "--seq_len", "16", "--eval_blocks", "2", *extra])


def rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("gas", [1, 2])
def test_resume_is_bit_exact(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, gas):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = write_config(tmp_path, gradient_accumulation_steps=gas)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(cfg, tiny_model_dir, tiny_text_file, straight, "--max_steps", "6")
    run_train(cfg, tiny_model_dir, tiny_text_file, split, "--max_steps", "6", "--stop_at", "4")
    assert (split / "latest").read_text().strip() == "checkpoint-4"
    run_train(cfg, tiny_model_dir, tiny_text_file, tmp_path / "ignored", "--max_steps", "6",
              "--resume_from_checkpoint", str(split), "--output_dir", str(split))
    a, b = rows(straight), rows(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # bit-identical: ==, not approx
        assert (a[step]["loss"], a[step]["lr"], a[step]["tokens"]) == (b[step]["loss"], b[step]["lr"], b[step]["tokens"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, split))
    assert sa["state_sha256"] == sb["state_sha256"]  # int8 weights, scales, outliers, momentum, float params
    ma, mb = (checkpoint.read_meta(d / "checkpoint-6") for d in (straight, split))
    assert ma["files"]["model.safetensors"] == mb["files"]["model.safetensors"]
    assert ma["files"]["optimizer.safetensors"] == mb["files"]["optimizer.safetensors"]
    assert ma["optimizer"]["qft"]["step_count"] == 6


def test_failed_save_leaves_the_previous_checkpoint(tiny_llama, tmp_path, monkeypatch):
    engine, opt, cfg = small_engine(tiny_llama)
    one_step(engine, 0)
    checkpoint.save(tmp_path, engine, opt, step=1, ds_config=cfg)
    saved = state_hash(engine.module, opt)
    one_step(engine, 1)
    real = checkpoint_io.save_tensors

    def dies_midway(tensors, path):
        if path.name == "optimizer.safetensors":  # model.safetensors is already written by now
            raise OSError("disk full (injected)")
        real(tensors, path)
    monkeypatch.setattr(checkpoint_io, "save_tensors", dies_midway)
    for step in (2, 1):  # a new step, and re-saving over the existing one
        with pytest.raises(OSError, match="injected"):
            checkpoint.save(tmp_path, engine, opt, step=step, ds_config=cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]  # no temp folders left
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    monkeypatch.setattr(checkpoint_io, "save_tensors", real)
    engine2, opt2, _ = small_engine(tiny_llama)
    meta = checkpoint.load(tmp_path, engine2, opt2, ds_config=cfg)
    assert meta["step"] == 1 and state_hash(engine2.module, opt2) == saved and opt2.step_count == 1


@pytest.fixture
def saved_ckpt(tiny_llama, tmp_path):
    engine, opt, cfg = small_engine(tiny_llama)
    one_step(engine, 0)
    return checkpoint.save(tmp_path / "run", engine, opt, step=1, ds_config=cfg), cfg


def corrupt_byte(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def set_version(ckpt):
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["format_version"] = 99
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,match", [
    (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    (corrupt_byte, "corrupt: model.safetensors"),
    (lambda c: (c / "meta.json").write_text("{not json"), "meta.json is unreadable or corrupt"),
    (set_version, "format version 99; this qft_ds"),
    (lambda c: (c.parent / "latest").write_text("checkpoint-7\n"), "names 'checkpoint-7'"),
    (lambda c: (c.parent / "latest").unlink(), "has no 'latest' file; it holds checkpoint-1"),
])
def test_bad_checkpoint_is_a_clear_error_and_changes_nothing(saved_ckpt, tiny_llama, damage, match):
    ckpt, cfg = saved_ckpt
    damage(ckpt)
    engine, opt, _ = small_engine(tiny_llama)
    before = state_hash(engine.module, opt)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(ckpt.parent, engine, opt, ds_config=cfg)
    assert state_hash(engine.module, opt) == before and opt.step_count == 0


def test_checkpoint_of_another_model_or_config_is_refused(saved_ckpt, tiny_llama):
    ckpt, cfg = saved_ckpt
    engine, opt, cfg2 = small_engine(tiny_llama, group_size=32)
    with pytest.raises(CheckpointError, match="'qft.group_size' \\(128 saved, 32 now\\)"):
        checkpoint.load(ckpt, engine, opt, ds_config=cfg2)
    engine, opt, _ = small_engine(lambda: tiny_llama(hidden=32))
    with pytest.raises(CheckpointError, match="model.embed_tokens.qweight has shape"):
        checkpoint.load(ckpt, engine, opt, ds_config=cfg)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(ckpt.parent / "nope", engine, opt)


@pytest.mark.parametrize("save", [True, False])
def test_sigterm_finishes_the_step_saves_and_exits_nonzero(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                           save):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    real = textdata.batches

    def batches(*args, **kwargs):  # the launcher's SIGTERM arrives while step 3 runs
        for i, b in enumerate(real(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b
    monkeypatch.setattr(textdata, "batches", batches)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_train(write_config(tmp_path), tiny_model_dir, tiny_text_file, out, "--max_steps", "6",
                  *([] if save else ["--no-save_on_interrupt"]))
    assert exc.value.code == 128 + signal.SIGTERM
    assert max(rows(out)) == 3  # step 3 finished
    if save:
        assert (out / "latest").read_text().strip() == "checkpoint-3"
        assert checkpoint.read_meta(out / "checkpoint-3")["step"] == 3
    else:
        assert not (out / "latest").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_resume_from_nothing_is_a_clear_exit(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--resume_from_checkpoint: .*empty is not a checkpoint"):
        run_train(write_config(tmp_path), tiny_model_dir, tiny_text_file, tmp_path / "o", "--resume_from_checkpoint",
                  str(tmp_path / "empty"))
