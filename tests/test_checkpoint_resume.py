"""What a resume may change (issue 18, item 4), and a torn metrics.jsonl (item 7)."""
import json
import logging

import pytest

from checkpoint_attacks import one_step, small_engine
from qft_ds import checkpoint, run_folder
from qft_ds.checkpoint import CheckpointError, state_hash
from test_checkpoint import rows, run_train, write_config


def changed(cfg, path, value):
    cfg = json.loads(json.dumps(cfg))
    *keys, last = path.split(".")
    d = cfg
    for k in keys:
        d = d.setdefault(k, {})
    d[last] = value
    return cfg


REFUSED = [
    ("gradient_accumulation_steps", 2, r"'gradient_accumulation_steps' \(1 saved, 2 now\)"),
    ("optimizer.params.lr", 1e-2, r"'optimizer.params.lr' \(0.002 saved, 0.01 now\)"),
    ("optimizer.params.weight_decay", 0.5, "'optimizer.params.weight_decay'"),
    ("optimizer.params.betas", [0.5, 0.9], "'optimizer.params.betas'"),
    ("gradient_clipping", 0.0, r"'gradient_clipping' \(1.0 saved, 0.0 now\)"),
    ("bf16.enabled", False, "'bf16.enabled' .True saved, False now."),
    ("scheduler.params.warmup_num_steps", 7, "'scheduler.params.warmup_num_steps'"),
    ("scheduler.type", "WarmupLR", "'scheduler.type'"),
    ("qft.rounding", "rtn", "'qft.rounding' .'sr' saved, 'rtn' now."),
]


@pytest.fixture
def saved(tiny_llama, tmp_path):
    engine, opt, cfg = small_engine(tiny_llama)
    one_step(engine, 0)
    return checkpoint.save(tmp_path / "run", engine, opt, step=1, ds_config=cfg), cfg


@pytest.mark.parametrize("path,value,match", REFUSED)
def test_a_change_that_the_state_was_not_made_under_is_refused_by_name(saved, tiny_llama, path, value, match):
    ckpt, cfg = saved
    engine, opt, _ = small_engine(tiny_llama)
    before = state_hash(engine.module, opt)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(ckpt, engine, opt, ds_config=changed(cfg, path, value))
    assert state_hash(engine.module, opt) == before and opt.step_count == 0


@pytest.mark.parametrize("path,value", [
    ("scheduler.params.total_num_steps", 99), ("zero_optimization.stage", 2), ("steps_per_print", 7),
    ("train_micro_batch_size_per_gpu", 2), ("qft.flow", "stack"), ("gradient_clipping", 1),  # 1 == 1.0
])
def test_legal_changes_load(saved, tiny_llama, path, value):
    ckpt, cfg = saved
    engine, opt, _ = small_engine(tiny_llama)
    assert checkpoint.load(ckpt, engine, opt, ds_config=changed(cfg, path, value))["step"] == 1


def test_defaults_written_out_are_no_change(saved, tiny_llama):
    ckpt, cfg = saved
    cfg2 = changed(cfg, "fp16.enabled", False)
    engine, opt, _ = small_engine(tiny_llama)
    checkpoint.load(ckpt, engine, opt, ds_config=cfg2)


def test_a_torn_last_metrics_line_is_dropped_and_said(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        assert [json.loads(r)["step"] for r in run_folder.metrics_lines(path, 2)] == [1, 2]
    assert f"{path}: line 3, the last, is cut off" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')  # not the last line: not a torn write
    with pytest.raises(run_folder.RunFolderError, match=f"{path}: line 2 is not a metrics row"):
        run_folder.metrics_lines(path, 3)


def test_train_resume_refuses_a_new_accumulation_and_follows_a_longer_schedule(tiny_model_dir, tiny_text_file,
                                                                               tmp_path, monkeypatch, caplog):
    """A torn metrics line does not block the resume; gradient_accumulation_steps 1 -> 2 would skip
    micro-batches and is refused; --max_steps 6 -> 8 is legal, and the lr of steps 5-8 is then exactly that of
    a run planned for 8 steps from the start (the checkpoint's param-group lr came from the 6-step plan)."""
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = write_config(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(cfg, tiny_model_dir, tiny_text_file, straight, "--max_steps", "8")
    run_train(cfg, tiny_model_dir, tiny_text_file, split, "--max_steps", "6", "--stop_at", "4")
    planned_for_6 = checkpoint.read_meta(split / "checkpoint-4")["optimizer"]["param_groups"][0]["lr"]
    with pytest.raises(SystemExit, match="'gradient_accumulation_steps' \\(1 saved, 2 now\\)"):
        run_train(write_config(tmp_path, gradient_accumulation_steps=2), tiny_model_dir, tiny_text_file, split,
                  "--max_steps", "8", "--resume_from_checkpoint", str(split))
    metrics = split / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "loss": 3.')  # a run killed while writing a row
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        run_train(cfg, tiny_model_dir, tiny_text_file, split, "--max_steps", "8", "--resume_from_checkpoint",
                  str(split))
    assert "line 5, the last, is cut off" in caplog.text
    a, b = rows(straight), rows(split)
    assert sorted(b) == list(range(1, 9))
    assert [b[s]["lr"] for s in range(5, 9)] == [a[s]["lr"] for s in range(5, 9)]
    assert planned_for_6 != a[5]["lr"]  # what step 5 used before the resume recomputed it
