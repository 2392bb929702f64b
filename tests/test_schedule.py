"""The warm-up schedule: every shipped config's first step has lr > 0, and the warm-up climbs to the peak."""
import json
import logging
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds.schedule import build_warmup_schedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")
                 if "scheduler" in json.loads(p.read_text()))


def test_every_shipped_config_with_a_schedule_is_checked():
    every = {p.name for p in (ROOT / "ds_configs").glob("*.json")}
    # qft_hf.json leaves the schedule to HF Trainer / accelerate (their own warm-up arguments)
    assert set(CONFIGS) == every - {"qft_hf.json"}, CONFIGS


def lrs_of_steps(ds: dict) -> tuple[list[float], float]:
    """(the lr each optimizer step uses, as the engine steps the schedule after each, the peak lr)."""
    peak = float(ds["optimizer"]["params"]["lr"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = build_warmup_schedule(ds, opt)
    assert schedule is not None and "scheduler" not in ds
    lrs = []
    for _ in range(schedule.total_num_steps if hasattr(schedule, "total_num_steps") else 50):
        lrs.append(opt.param_groups[0]["lr"])
        schedule.step()
    return lrs, peak


@pytest.mark.parametrize("name", CONFIGS)
def test_no_step_of_a_shipped_schedule_runs_at_lr_0(name):
    ds = json.loads((ROOT / "ds_configs" / name).read_text())
    warmup = ds["scheduler"]["params"]["warmup_num_steps"]
    lrs, peak = lrs_of_steps(ds)
    assert min(lrs) > 0, lrs
    assert lrs[:warmup] == sorted(lrs[:warmup]) and lrs[0] < lrs[warmup - 1]  # climbing during the warm-up
    assert lrs[0] == pytest.approx(peak / warmup)  # linear: step s of W at s/W of the peak
    assert max(lrs) <= peak * (1 + 1e-12)


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
@pytest.mark.parametrize("warmup_type", ["linear", "log"])
def test_every_deepspeed_warmup_schedule_starts_above_0(kind, warmup_type):
    params = {"warmup_num_steps": 5, "warmup_type": warmup_type}
    if kind != "WarmupLR":
        params["total_num_steps"] = 20
    if kind == "WarmupLR":
        params["warmup_max_lr"] = 1e-3
    ds = {"optimizer": {"params": {"lr": 1e-3}}, "scheduler": {"type": kind, "params": params}}
    lrs, _ = lrs_of_steps(ds)
    assert lrs[0] > 0 and lrs[1] > lrs[0]


def test_other_schedules_are_left_to_deepspeed():
    ds = {"scheduler": {"type": "OneCycle", "params": {}}}
    assert build_warmup_schedule(ds, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)) is None
    assert "scheduler" in ds


def test_initialize_uses_it_quietly(tiny_llama, caplog):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["bf16"] = {"enabled": False}
    with caplog.at_level(logging.WARNING):
        engine, opt, _, sched = qft_ds.initialize(model=tiny_llama(), config=cfg)
    assert "before it has started" not in caplog.text
    assert sched is engine.lr_scheduler and type(sched).__name__ == "WarmupCosineLR"
    first = opt.param_groups[0]["lr"]
    x = torch.randint(0, 128, (2, 8))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    assert 0 < first < opt.param_groups[0]["lr"]  # step 1 trains, step 2 higher: still warming up
