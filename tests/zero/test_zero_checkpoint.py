"""Sharded checkpoints: save on 2 ranks and resume on 1 (and the reverse), at any stage, continue
bit-identically; consolidation streams a plain checkpoint that `qft_ds export` and stage 0 read.

Gradients are injected (the same on every rank), so a 1-rank and a 2-rank step give the same bits
(test_zero_sharding.py) and any difference here would be the checkpoint's.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import harness as H
from qft_ds import checkpoint
from qft_ds.checkpoint import CheckpointError
from qft_ds.zero.consolidate import consolidate


def _worker(rank, world, tmp):
    # A: stage 2 (with error feedback) saves after 2 steps and runs on to 4
    model, opt = H.build(2, rounding="ef")
    H.inject_steps(model, opt, 2)
    checkpoint.save(f"{tmp}/a", model, opt, step=2)
    H.inject_steps(model, opt, 2, start=2)
    final_a = H.full_state(model, opt)
    # D: stage 3 resumes the 1-rank plain checkpoint C; E: stage 1 resumes A (2 ranks -> 2 ranks)
    finals = {}
    for name, stage, src in (("d", 3, "c"), ("e", 1, "a")):
        model, opt = H.build(stage, rounding="ef")
        checkpoint.load(f"{tmp}/{src}", model, opt)
        H.inject_steps(model, opt, 2, start=2)
        finals[name] = H.full_state(model, opt)
    if rank == 0:
        torch.save({"a": final_a, **finals}, f"{tmp}/finals.pt")


def _resume_one_rank(src, stage=0):
    model, opt = H.build(stage, rounding="ef")
    checkpoint.load(src, model, opt)
    H.inject_steps(model, opt, 2, start=2)
    return H.full_state(model, opt)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zckpt")
    model, opt = H.build(0, rounding="ef")  # C: one device, plain checkpoint at step 2, on to 4
    H.inject_steps(model, opt, 2)
    checkpoint.save(tmp / "c", model, opt, step=2)
    H.inject_steps(model, opt, 2, start=2)
    final_c = H.full_state(model, opt)
    H.spawn(_worker, str(tmp))
    return tmp, final_c, torch.load(tmp / "finals.pt", weights_only=False)


def test_resume_across_world_sizes_and_stages_is_exact(run):
    tmp, final_c, finals = run
    H.assert_same(finals["a"], final_c, "2 ranks stage 2, unbroken")
    H.assert_same(finals["d"], final_c, "1-rank plain checkpoint resumed on 2 ranks, stage 3")
    H.assert_same(finals["e"], final_c, "2-rank stage-2 checkpoint resumed on 2 ranks, stage 1")
    H.assert_same(_resume_one_rank(tmp / "a"), final_c, "2-rank checkpoint resumed on 1 rank, stage 0")
    H.assert_same(_resume_one_rank(tmp / "a", stage=3), final_c, "2-rank checkpoint resumed on 1 rank, stage 3")


def test_sharded_layout_on_disk(run):
    tmp = run[0]
    ckpt = tmp / "a" / "checkpoint-2"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["zero"]["world_size"] == 2 and meta["zero"]["stage"] == 2
    shards = [load_file(ckpt / "zero" / f"rank-{r:05d}.safetensors") for r in range(2)]
    for prefix, bounds in meta["zero"]["bounds"].items():
        for r, (lo, hi) in enumerate(bounds):
            assert shards[r][f"{prefix}.codes"].numel() == hi - lo  # each rank wrote its slice only
            assert shards[r][f"{prefix}.m_codes"].numel() == hi - lo
    assert not any(k.endswith(".codes") for k in load_file(ckpt / "model.safetensors"))


def test_consolidate_gives_a_plain_checkpoint_and_exports(run, tmp_path):
    tmp, final_c, _ = run
    from qft_ds.cli import main
    assert main(["consolidate", str(tmp / "a"), str(tmp_path / "plain")]) == 0
    plain = tmp_path / "plain"
    meta = checkpoint.read_meta(plain)
    assert "zero" not in meta and meta["consolidated_from"] == {"world_size": 2, "stage": 2}
    # the 1-rank plain checkpoint C saved at the same step holds the same bits, file for file
    c = tmp / "c" / "checkpoint-2"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(plain / name), load_file(c / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    H.assert_same(_resume_one_rank(plain), final_c, "consolidated checkpoint resumed on 1 rank")
    with pytest.raises(CheckpointError, match="already a plain checkpoint"):
        consolidate(plain, tmp_path / "again")


def test_export_reads_a_sharded_checkpoint(run, tmp_path):
    from qft_ds.export import export
    tmp = run[0]
    export(tmp / "a", tmp_path / "from_zero", dtype="fp32")
    export(tmp / "c", tmp_path / "from_plain", dtype="fp32")
    a, b = load_file(tmp_path / "from_zero" / "model.safetensors"), load_file(tmp_path / "from_plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_accepts_another_split_of_the_global_batch(monkeypatch, tmp_path):
    """train.py: a step reads micro-batch x ranks blocks, so 2 ranks x 2 may resume as 1 rank x 4."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import train
    saved = {"dataset": "d", "seq_len": 16, "micro_batch": 2, "world_size": 2, "seed": 0}
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: {"step": 3, "data": saved})
    args = type("A", (), {"resume_from_checkpoint": "x", "deepspeed": str(tmp_path / "c.json")})()
    (tmp_path / "c.json").write_text("{}")
    assert train.resume(args, None, None, dict(saved, micro_batch=4, world_size=1))[0] == 3
    with pytest.raises(SystemExit, match=r"micro-batch x ranks 2 x 2 -> 2 x 1"):
        train.resume(args, None, None, dict(saved, world_size=1))
