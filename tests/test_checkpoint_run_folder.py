"""The run folder around the checkpoints (issue 18, items 3, 6, 8 and 10): a killed re-save is recovered,
leftovers of killed saves are tidied (ours only), `latest` stays inside the run folder, one writer at a
time, and checkpoints take the umask's modes."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from checkpoint_attacks import one_step, small_engine
from qft_ds import checkpoint, run_folder
from qft_ds.checkpoint import CheckpointError, state_hash


@pytest.fixture
def run(tiny_llama, tmp_path):
    """A run folder with checkpoint-1, and the engine that wrote it (moved on by a step)."""
    engine, opt, cfg = small_engine(tiny_llama)
    one_step(engine, 0)
    checkpoint.save(tmp_path / "run", engine, opt, step=1, ds_config=cfg)
    saved = state_hash(engine.module, opt)
    one_step(engine, 1)
    return tmp_path / "run", engine, opt, cfg, saved


def test_a_resave_killed_mid_swap_is_recovered_at_the_next_start(run, tiny_llama, caplog):
    """publish() moves checkpoint-1 aside before renaming the new one in; killed in between, `latest`
    named a missing folder and the data sat in .old-checkpoint-1-PID."""
    out, _, _, cfg, saved = run
    os.rename(out / "checkpoint-1", out / ".old-checkpoint-1-4242")  # what the kill left
    engine, opt, _ = small_engine(tiny_llama)
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        meta = checkpoint.load(out, engine, opt, ds_config=cfg)
    assert meta["step"] == 1 and state_hash(engine.module, opt) == saved
    assert "recovered checkpoint-1 from .old-checkpoint-1-4242" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "latest"]


def test_a_resave_killed_after_the_swap_drops_the_old_copy(run):
    out, engine, opt, cfg, _ = run
    (out / ".old-checkpoint-1-4242").mkdir()  # the new copy was already in place
    ((out / ".old-checkpoint-1-4242") / "meta.json").write_text("{}")
    checkpoint.save(out, engine, opt, step=2, ds_config=cfg)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "latest"]


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(run, caplog):
    out, engine, opt, cfg, _ = run
    ours = [".tmp-checkpoint-3-777", ".tmp-checkpoint-2-zero", ".latest.tmp9999"]
    for name in ours[:2]:
        (out / name / "zero").mkdir(parents=True)
        (out / name / "zero" / "rank-00000.safetensors").write_bytes(b"x" * 1000)
    (out / ours[2]).write_text("checkpoint-3\n")
    theirs = [".tmp-notes", "checkpoint-notes", ".old-checkpoint-x", "mine.tmp"]
    for name in theirs:
        (out / name).mkdir()
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        checkpoint.save(out, engine, opt, step=2, ds_config=cfg)
    assert "removed 3 leftover(s) of killed saves" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint-1", "checkpoint-2", "latest", *theirs])


@pytest.mark.parametrize("text,match", [
    ("", "latest is empty"),
    ("../other_run/checkpoint-1\n", "holds '../other_run/checkpoint-1', not a checkpoint folder's name"),
    ("/abs/run/checkpoint-1", "not a checkpoint folder's name"),
    (b"\xff\xfe\x00garbage", "latest is not text"),
    ("checkpoint-7", "names 'checkpoint-7', but"),
])
def test_latest_names_a_folder_inside_its_run_folder(run, tiny_llama, text, match):
    out, _, _, cfg, _ = run
    other = out.parent / "other_run"
    other.mkdir()
    os.rename(out / "checkpoint-1", other / "checkpoint-1")  # a valid checkpoint, elsewhere
    (out / "latest").write_bytes(text if isinstance(text, bytes) else text.encode())
    engine, opt, _ = small_engine(tiny_llama)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(out, engine, opt, ds_config=cfg)
    assert opt.step_count == 0


def test_latest_may_not_be_a_link_out_of_the_run_folder(run, tiny_llama):
    out, _, _, cfg, _ = run
    os.rename(out / "checkpoint-1", out.parent / "elsewhere")
    os.symlink(out.parent / "elsewhere", out / "checkpoint-1")
    engine, opt, _ = small_engine(tiny_llama)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        checkpoint.load(out, engine, opt, ds_config=cfg)


HOLD = "import sys, time; from qft_ds import run_folder; run_folder.acquire(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(60)"


def test_a_second_writer_is_refused(run):
    out, engine, opt, cfg, _ = run
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"in use by another live run, pid {holder.pid}"):
            checkpoint.save(out, engine, opt, step=2, ds_config=cfg)
        assert not (out / "checkpoint-2").exists()
    finally:
        holder.kill()
        holder.wait()
    checkpoint.save(out, engine, opt, step=2, ds_config=cfg)  # its lock is stale now: taken over
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert not (out / run_folder.LOCK).exists()  # released after the save


def test_stale_and_foreign_locks(run, caplog):
    out, engine, opt, cfg, _ = run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = out / run_folder.LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": None}))
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        checkpoint.save(out, engine, opt, step=2, ds_config=cfg)
    assert f"removed a stale lock of pid {dead.pid}" in caplog.text
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "started": None}))
    with pytest.raises(CheckpointError, match="in use by pid 1 on host another-node .*delete"):
        checkpoint.save(out, engine, opt, step=3, ds_config=cfg)
    lock.write_text("garbage")
    with pytest.raises(CheckpointError, match="is not a qft_ds lock file"):
        checkpoint.save(out, engine, opt, step=3, ds_config=cfg)


@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_checkpoints_take_the_umask_modes(tiny_llama, tmp_path, umask, dirs, files):
    """Not always 0700: mkdtemp's private folder made checkpoints unreadable to the user's group."""
    engine, opt, cfg = small_engine(tiny_llama)
    old = os.umask(umask)
    try:
        ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=1, ds_config=cfg)
    finally:
        os.umask(old)
    for p in [ckpt, *ckpt.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (dirs if p.is_dir() else files), p
