"""The manifest (meta.json) is hashed and validated, and a load checks everything before it writes anything
(issue 18, items 2 and 5)."""
import subprocess

import pytest
import torch

from checkpoint_attacks import edit_meta, edit_tensors, one_step, reseal, small_engine
from qft_ds import checkpoint
from qft_ds.checkpoint import CheckpointError, state_hash


@pytest.fixture
def saved(tiny_llama, tmp_path):
    engine, opt, cfg = small_engine(tiny_llama)
    one_step(engine, 0)
    return checkpoint.save(tmp_path / "run", engine, opt, step=1, ds_config=cfg), cfg


def refused_and_unchanged(ckpt, cfg, tiny_llama, match):
    """A fresh engine that has trained a step: the load is refused with `match`, and changes nothing."""
    engine, opt, _ = small_engine(tiny_llama)
    one_step(engine, 5)
    before, lr, sched = state_hash(engine.module, opt), opt.param_groups[0]["lr"], engine.lr_scheduler.state_dict()
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(ckpt, engine, opt, ds_config=cfg)
    assert state_hash(engine.module, opt) == before and opt.step_count == 1
    assert opt.param_groups[0]["lr"] == lr and engine.lr_scheduler.state_dict() == sched


def scale(path, factor):
    def change(meta):
        *keys, last = path
        d = meta
        for k in keys:
            d = d[k]
        d[last] = d[last] * factor if factor is not None else -1
    return change


# the probe's seven single-field edits, each loaded silently before the manifest had its own hash
EDITS = {
    "files emptied": lambda m: m.update(files={}),
    "step 1 -> 2": lambda m: m.update(step=2),
    "step -1": lambda m: m.update(step=-1),
    "step_count x100": scale(["optimizer", "qft", "step_count"], 100),
    "scheduler iteration": scale(["scheduler", "last_batch_iteration"], 100),
    "lr x100": lambda m: m["optimizer"]["param_groups"][0].update(lr=m["optimizer"]["param_groups"][0]["lr"] * 100),
    "quant group": scale(["quant", "model.layers.0.mlp.down_proj.qweight", "group"], 2),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_manifest_fails_its_own_hash(saved, tiny_llama, edit):
    ckpt, cfg = saved
    edit_meta(ckpt, EDITS[edit])
    refused_and_unchanged(ckpt, cfg, tiny_llama, "meta.json does not match its sha256 in meta.sha256")


def test_a_missing_manifest_hash_is_refused(saved, tiny_llama):
    ckpt, cfg = saved
    (ckpt / "meta.sha256").unlink()
    refused_and_unchanged(ckpt, cfg, tiny_llama, "meta.sha256 is missing")


# with the manifest re-hashed too, every field is still checked by name: no bare KeyError, no silent load
FIELDS = [
    (lambda m: m.update(files={}), '"files.model.safetensors" is missing'),
    (lambda m: m.update(step=-1), '"step" is -1; expected an integer >= 0'),
    (lambda m: m.update(step="4"), '"step" is 4; expected an integer'),
    (lambda m: m.pop("engine"), '"engine" is missing'),
    (lambda m: m["engine"].update(module=1), '"engine" is .*expected exactly the keys'),
    (lambda m: m["optimizer"]["param_groups"][0].update(lr="abc"), r'"optimizer.param_groups\[0\].lr" is abc'),
    (lambda m: m["optimizer"]["param_groups"][0].update(lr=float("nan")), r'"optimizer.param_groups\[0\].lr" is nan'),
    (lambda m: m["optimizer"]["qft"].pop("step_count"), '"optimizer.qft.step_count" is missing'),
    (lambda m: m.pop("quant"), '"quant" is missing'),
    (scale(["quant", "model.layers.0.mlp.down_proj.qweight", "group"], 2), "has group 256 in the checkpoint, 128 in"),
    (lambda m: m["files"].update({"../x": "0" * 64}), '"files.../x" is ../x; expected a path inside'),
    (lambda m: m["optimizer"]["scalars"].update({"999.x": 1}), '"optimizer.scalars.999.x"'),
]


@pytest.mark.parametrize("i", range(len(FIELDS)))
def test_every_field_is_validated_by_name(saved, tiny_llama, i):
    ckpt, cfg = saved
    change, match = FIELDS[i]
    edit_meta(ckpt, change, rehash=True)
    refused_and_unchanged(ckpt, cfg, tiny_llama, match)


def first_momentum(tensors):
    return next(k for k in tensors if k.endswith(".m_codes"))


DAMAGE = [  # tensor files rewritten and re-hashed: only the state checks stand in the way
    ("optimizer.safetensors", lambda t: t.update({first_momentum(t): t[first_momentum(t)][:-1].clone()}),
     r"optimizer state '\d+.m_codes' is torch.int8\[\d+\] in the checkpoint; this run needs torch.int8"),
    ("optimizer.safetensors", lambda t: t.update({first_momentum(t): t[first_momentum(t)].float()}),
     r"m_codes' is torch.float32"),
    ("optimizer.safetensors", lambda t: t.pop(first_momentum(t)), r"lacks \['m_codes'\]"),
    ("optimizer.safetensors", lambda t: t.update({"state.0.x.y": torch.zeros(1)}), "is not named state.INDEX.NAME"),
    ("optimizer.safetensors", lambda t: t.update({"state.9999.m_codes": torch.zeros(1)}), "parameter 9999, which no"),
    ("model.safetensors", lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()}),
     "'model.norm.weight' is torch.float32"),
    ("rng.safetensors", lambda t: t.update(cpu=t["cpu"][:10].clone()), "no CPU RNG state"),
]


@pytest.mark.parametrize("i", range(len(DAMAGE)))
def test_a_load_checks_everything_before_writing(saved, tiny_llama, i):
    ckpt, cfg = saved
    rel, change, match = DAMAGE[i]
    edit_tensors(ckpt, rel, change)
    refused_and_unchanged(ckpt, cfg, tiny_llama, match)


def test_an_optimizer_that_refuses_its_state_is_put_back(saved, tiny_llama):
    """QFTLion.load_state_dict sets its step counter before torch's checks: a failure there is undone."""
    ckpt, cfg = saved
    edit_meta(ckpt, lambda m: m["optimizer"]["qft"]["clip"].update(refs=[1.0]))
    reseal(ckpt)
    refused_and_unchanged(ckpt, cfg, tiny_llama, "the optimizer state does not load .*reference norms")


def test_a_version_1_checkpoint_says_how_to_vouch_for_it(saved, tiny_llama):
    """Version 1 had no meta.sha256: refused, with the two steps that make it version 2 by the user's word."""
    ckpt, cfg = saved
    edit_meta(ckpt, lambda m: m.update(format_version=1))
    (ckpt / "meta.sha256").unlink()
    refused_and_unchanged(ckpt, cfg, tiny_llama, "format version 1, written before .*sha256sum meta.json > meta.sha256")
    edit_meta(ckpt, lambda m: m.update(format_version=2))
    subprocess.run("sha256sum meta.json > meta.sha256", shell=True, cwd=ckpt, check=True)
    engine, opt, _ = small_engine(tiny_llama)
    assert checkpoint.load(ckpt, engine, opt, ds_config=cfg)["step"] == 1
