"""A ZeRO sharded checkpoint (2 ranks, stage 2) under the attacks of issue 18: manifest edits, shard files
cut, retyped or missing, leftovers of a killed save, a second writer. Each is refused by name with the
loading run unchanged, or tidied."""
import shutil
import subprocess
import sys

import pytest
import torch

import harness as H
from checkpoint_attacks import edit_meta, edit_tensors
from qft_ds import checkpoint, run_folder
from qft_ds.checkpoint import CheckpointError


def _save_on_two_ranks(rank, world, tmp):
    model, opt = H.build(2, rounding="ef")
    H.inject_steps(model, opt, 2)
    checkpoint.save(f"{tmp}/run", model, opt, step=2)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zattack")
    H.spawn(_save_on_two_ranks, str(tmp))
    return tmp / "run"


@pytest.fixture
def run(sharded, tmp_path):
    shutil.copytree(sharded, tmp_path / "run")
    return tmp_path / "run"


def first_key(tensors, kind):
    return next(k for k in sorted(tensors) if k.endswith(f".{kind}"))


def cut(kind):
    return lambda t: t.update({first_key(t, kind): t[first_key(t, kind)][:-1].clone()})


ATTACKS = [
    ("manifest edited", lambda c: edit_meta(c, lambda m: m["zero"].update(world_size=1)), "does not match its sha256"),
    ("bounds shifted", lambda c: edit_meta(c, lambda m: next(iter(m["zero"]["bounds"].values()))[0].__setitem__(1, 1),
                                           rehash=True), r'"zero.bounds.\S+" is .* tiling'),
    ("world size 3", lambda c: edit_meta(c, lambda m: m["zero"].update(world_size=3), rehash=True), "3 slices"),
    ("momentum cut", lambda c: edit_tensors(c, "zero/rank-00001.safetensors", cut("m_codes")),
     r"rank-00001.safetensors: '\S+.m_codes' is I8\[\d+\]; this run needs I8"),
    ("codes retyped", lambda c: edit_tensors(c, "zero/rank-00000.safetensors", lambda t: t.update(
        {first_key(t, "codes"): t[first_key(t, "codes")].to(torch.int16)})), r"'\S+.codes' is I16"),
    ("outliers dropped", lambda c: edit_tensors(c, "zero/rank-00001.safetensors", lambda t: t.pop(
        first_key(t, "outlier_val"))), "has no tensor"),
    ("residual dropped", lambda c: edit_tensors(c, "zero/rank-00000.safetensors", lambda t: t.pop(
        first_key(t, "residual"))), "has no tensor|no error-feedback residual"),
    ("shard missing", lambda c: (c / "zero" / "rank-00001.safetensors").unlink(), "is incomplete: zero/rank-00001"),
    ("latest outside", lambda c: (c.parent / "latest").write_text("../../checkpoint-2"), "not a checkpoint folder's"),
]


@pytest.mark.parametrize("name", [a[0] for a in ATTACKS])
@pytest.mark.parametrize("stage", [0, 3])
def test_damage_is_refused_and_changes_nothing(run, name, stage):
    _, damage, match = next(a for a in ATTACKS if a[0] == name)
    damage(run / "checkpoint-2")
    model, opt = H.build(stage, rounding="ef")
    H.inject_steps(model, opt, 1)
    before = H.full_state(model, opt)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(run, model, opt)
    H.assert_same(H.full_state(model, opt), before, name)
    assert opt.step_count == 1


def test_an_undamaged_copy_loads(run):
    model, opt = H.build(0, rounding="ef")
    assert checkpoint.load(run, model, opt)["step"] == 2 and opt.step_count == 2


def test_a_killed_sharded_save_is_tidied_by_the_next(run):
    """A ZeRO save writes every rank's shard into .tmp-checkpoint-STEP-zero: a kill leaves it near full size."""
    leftover = run / ".tmp-checkpoint-4-zero"
    shutil.copytree(run / "checkpoint-2", leftover)
    model, opt = H.build(2, rounding="ef")  # one rank: its ZeRO save takes the same path
    checkpoint.save(run, model, opt, step=3)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-3", "latest"]


def test_a_second_writer_is_refused_for_a_sharded_save(run):
    hold = "import sys, time; from qft_ds import run_folder; run_folder.acquire(sys.argv[1]); print(1, flush=True); " \
           "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        model, opt = H.build(2, rounding="ef")
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            checkpoint.save(run, model, opt, step=3)
        assert not (run / "checkpoint-3").exists() and not (run / ".tmp-checkpoint-3-zero").exists()
    finally:
        holder.kill()
        holder.wait()
    checkpoint.save(run, model, opt, step=3)  # the holder is gone: its lock is stale and taken over
    assert (run / "latest").read_text().strip() == "checkpoint-3" and not (run / run_folder.LOCK).exists()
