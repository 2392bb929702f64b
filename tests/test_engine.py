"""DeepSpeed integration: both ways in, config handling, and a loss that falls end to end."""
import json
from pathlib import Path

import deepspeed
import pytest
import torch

import qft_ds
from qft_ds.engine import split_config
from qft_ds.nn import QLinear

ROOT = Path(__file__).resolve().parents[1]


def ds_config(**qft):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["scheduler"]["params"].update(total_num_steps=20, warmup_num_steps=1)
    cfg["qft"].update(qft)
    return cfg


def run(engine, steps=12, gas=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (8, 16), generator=g)
    losses = []
    for _ in range(steps):
        total = 0.0
        for k in range(gas):
            xb = x[4 * k:4 * k + 4]  # micro-batch of 4 (the config's train_micro_batch_size_per_gpu)
            loss = engine(input_ids=xb, labels=xb).loss
            engine.backward(loss)
            engine.step()
            total += loss.item() / gas
        losses.append(total)
    return losses


def test_qft_ds_initialize_end_to_end_loss_falls(tiny_llama):
    model = tiny_llama()
    engine, opt, _, sched = qft_ds.initialize(model=model, config=ds_config())
    assert isinstance(engine.optimizer, qft_ds.QFTLion) and sched is not None
    assert isinstance(model.model.layers[0].mlp.up_proj, QLinear)
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16  # "bf16" = compute only
    assert all(p.dtype == torch.float32 for p in model.parameters())          # no bf16 stored state
    assert opt.max_grad_norm == 1.0 and engine.gradient_clipping() == 0.0     # clipping is ours
    assert not engine.enable_backward_allreduce  # one rank: no all-reduce of the float gradients
    losses = run(engine)
    assert losses[-1] < losses[0] - 0.3


def test_plain_deepspeed_initialize_after_import_converts_the_model(tiny_llama, tmp_path):
    path = tmp_path / "qft.json"
    path.write_text(json.dumps(ds_config()))
    model = tiny_llama()
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=str(path))
    assert isinstance(opt, qft_ds.QFTLion)
    assert isinstance(model.lm_head, QLinear)
    losses = run(engine, steps=8)
    assert losses[-1] < losses[0]


def test_gradient_accumulation_uses_the_int8_stack(tiny_llama):
    cfg = ds_config()
    cfg["gradient_accumulation_steps"] = 2
    engine, opt, _, _ = qft_ds.initialize(model=tiny_llama(), config=cfg)
    assert opt.flow.mode == "stack"
    losses = run(engine, steps=8, gas=2)
    assert losses[-1] < losses[0]
    assert opt.step_count == 8


def test_fused_with_accumulation_is_an_error(tiny_llama):
    cfg = ds_config(flow="fused")
    cfg["gradient_accumulation_steps"] = 4
    with pytest.raises(ValueError, match="qft.flow"):
        qft_ds.initialize(model=tiny_llama(), config=cfg)


@pytest.mark.parametrize("patch,match", [
    ({"qft": {"rounnding": "sr"}}, "did you mean 'rounding'"),
    ({"qft": {"rounding": "nearest"}}, "qft.rounding"),
    ({"qft": {"outlier_frac": "1%"}}, "qft.outlier_frac"),
    ({"qft": {"outlier_frac": 0.7}}, "qft.outlier_frac"),
    ({"qft": {"group_size": 0}}, "qft.group_size"),
    ({"qft": {"seed": 1.5}}, "qft.seed"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "optimizer.type"),
    ({"optimizer": {"type": "QFTLion", "params": {"learning_rate": 1e-3}}}, "optimizer.params.learning_rate"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
])
def test_bad_config_is_a_clear_error(patch, match):
    cfg = ds_config()
    for key, value in patch.items():
        if key == "qft":
            cfg["qft"].update(value)
        else:
            cfg[key] = value
    with pytest.raises(ValueError, match=match):
        split_config(cfg)


def test_missing_config_file_names_it(tiny_llama):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        qft_ds.initialize(model=tiny_llama(), config="nope.json")


def test_torch_optim_registration():
    assert torch.optim.QFTLion is qft_ds.QFTLion
