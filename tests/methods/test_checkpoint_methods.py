"""PEQA and QST checkpoints (a torch AdamW's state, low-bit or side-network models) under the attacks of
issue 18: a resume is exact, and damage is refused by name with nothing changed."""
import pytest
import torch

import qft_ds
from checkpoint_attacks import edit_meta, edit_tensors
from qft_ds import checkpoint
from qft_ds.checkpoint import CheckpointError, state_hash
from test_peqa import peqa_config, train
from test_qst import qst_config

CONFIGS = {"peqa": peqa_config, "qst": qst_config}


def engine_of(method, tiny_llama):
    cfg = CONFIGS[method]()
    engine, opt, _, _ = qft_ds.initialize(model=tiny_llama(), config=cfg)
    return engine, opt, cfg


@pytest.fixture(params=sorted(CONFIGS))
def saved(request, tiny_llama, tmp_path):
    engine, opt, cfg = engine_of(request.param, tiny_llama)
    train(engine, 2)
    ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=2, ds_config=cfg)
    return request.param, ckpt, cfg, state_hash(engine.module, opt)


def test_a_resume_restores_the_state_exactly(saved, tiny_llama):
    method, ckpt, cfg, want = saved
    engine, opt, _ = engine_of(method, tiny_llama)
    assert checkpoint.load(ckpt.parent, engine, opt, ds_config=cfg)["step"] == 2
    assert state_hash(engine.module, opt) == want


def first_float(tensors):
    return next(k for k, v in sorted(tensors.items()) if v.is_floating_point() and v.numel() > 3)


def exp_avg(tensors):
    return next(k for k in tensors if k.endswith(".exp_avg"))


ATTACKS = [
    ("manifest edited", lambda c: edit_meta(c, lambda m: m.update(step=9)), "does not match its sha256"),
    ("step -1, re-hashed", lambda c: edit_meta(c, lambda m: m.update(step=-1), rehash=True), '"step" is -1'),
    ("momentum cut", lambda c: edit_tensors(c, "optimizer.safetensors", lambda t: t.update(
        {exp_avg(t): t[exp_avg(t)].flatten()[:-1].clone()})), r"optimizer state '\d+.exp_avg' is torch.float32"),
    ("a weight cut", lambda c: edit_tensors(c, "model.safetensors", lambda t: t.update(
        {first_float(t): t[first_float(t)].flatten()[:3].clone()})), r"' is torch.float32\[3\] in the checkpoint"),
    ("latest garbage", lambda c: (c.parent / "latest").write_bytes(b"\x00\xff"), "latest is not text"),
]


@pytest.mark.parametrize("name", [a[0] for a in ATTACKS])
def test_damage_is_refused_and_changes_nothing(saved, tiny_llama, name):
    method, ckpt, cfg, _ = saved
    _, damage, match = next(a for a in ATTACKS if a[0] == name)
    damage(ckpt)
    engine, opt, _ = engine_of(method, tiny_llama)
    train(engine, 1)
    before = state_hash(engine.module, opt)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(ckpt.parent, engine, opt, ds_config=cfg)
    assert state_hash(engine.module, opt) == before


def test_a_new_lr_is_refused(saved, tiny_llama):
    method, ckpt, cfg, _ = saved
    engine, opt, _ = engine_of(method, tiny_llama)
    cfg2 = CONFIGS[method](lr=cfg["optimizer"]["params"]["lr"] * 2)
    with pytest.raises(CheckpointError, match="'optimizer.params.lr'"):
        checkpoint.load(ckpt, engine, opt, ds_config=cfg2)
    assert not any(torch.is_tensor(v) for st in opt.state.values() for v in st.values())
