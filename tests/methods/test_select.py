"""The "qft.method" key picks the method; its keys and optimizer are checked with errors naming the key."""
import json
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds.config import QFTConfig
from qft_ds.engine import split_config
from qft_ds.methods import QSTModel
from qft_ds.nn import QLinear
from qft_ds.nn.lowbit import LowBitLinear

ROOT = Path(__file__).resolve().parents[2]


def config(name):
    return json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["qft", "peqa", "qst"])
def test_each_shipped_config_selects_its_method(tiny_llama, name):
    cfg = config(name)
    if name == "qst":
        cfg["qft"].update(r=4, adapter_rank=4)  # the tiny model's hidden size is 64
    model = tiny_llama()
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    assert engine.qft_config.method == name
    layer = model.model.layers[0].self_attn.q_proj
    if name == "qft":
        assert isinstance(opt, qft_ds.QFTLion) and isinstance(layer, QLinear)
        return
    assert type(opt) is torch.optim.AdamW and isinstance(layer, LowBitLinear)
    assert layer.compute_dtype == torch.bfloat16 and not engine.bfloat16_enabled()  # bf16 = compute only
    assert engine.gradient_clipping() == 0.0  # clipping is qft_ds's, over the trainable parameters
    trainable = {id(p) for p in engine.module.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(p.dtype == torch.float32 for p in engine.module.parameters() if p.requires_grad)
    if name == "qst":
        assert isinstance(engine.module, QSTModel)
    else:
        assert trainable == {id(m.qweight.scale) for m in model.modules() if isinstance(m, LowBitLinear)}


def test_clipping_is_applied_and_the_preclip_norm_reported(tiny_llama):
    cfg = config("peqa")
    cfg["gradient_clipping"] = 1e-4
    engine, opt, _, _ = qft_ds.initialize(model=tiny_llama(), config=cfg)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for g in o.param_groups for p in g["params"]])).item()))
    x = torch.randint(0, 128, (4, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    assert seen[0] == pytest.approx(1e-4, rel=1e-3) and engine.get_global_grad_norm() > 1e-3


@pytest.mark.parametrize("section,match", [
    ({"method": "lora"}, r"'qft.method' must be one of qft, peqa, qst; got 'lora'"),
    ({"method": 3}, r"'qft.method' must be a string"),
    ({"method": "peqa", "rounding": "sr"}, r"'qft.rounding' applies to method qft only; remove it for method 'peqa'"),
    ({"method": "qft", "r": 8}, r"'qft.r' applies to method qst only"),
    ({"method": "peqa", "bits": 8}, r"'qft.bits' must be 3 or 4"),
    ({"method": "qst", "downsample": "conv"}, r"'qft.downsample' must be one of adapter, linear, maxpool, avgpool"),
    ({"method": "qst", "adpter_rank": 4}, r"did you mean 'adapter_rank'"),
    ({"method": "qst", "r": 0}, r"'qft.r' must be >= 1"),
    ({"method": "qft", "group_size": 0}, r"'qft.group_size' must be >= 1"),
])
def test_bad_sections_are_clear_errors(section, match):
    with pytest.raises(ValueError, match=match):
        QFTConfig.from_dict(section)


def test_per_channel_group_is_allowed_for_lowbit_methods():
    assert QFTConfig.from_dict({"method": "peqa", "group_size": 0}).group_size == 0


@pytest.mark.parametrize("optimizer,match", [
    ({"type": "QFTLion", "params": {"lr": 1e-4}}, "trains int8 weights"),
    ({"type": "Adamz", "params": {}}, "not a torch.optim optimizer"),
])
def test_optimizer_type_must_fit_the_method(optimizer, match):
    cfg = config("peqa")
    cfg["optimizer"] = optimizer
    with pytest.raises(ValueError, match=match):
        split_config(cfg)


def test_unknown_optimizer_param_names_the_key(tiny_llama):
    cfg = config("peqa")
    cfg["optimizer"]["params"]["momentum"] = 0.9
    with pytest.raises(ValueError, match="unknown key 'optimizer.params.momentum'"):
        qft_ds.initialize(model=tiny_llama(), config=cfg)


def test_missing_optimizer_and_zero_stage_are_errors():
    cfg = config("qst")
    del cfg["optimizer"]
    with pytest.raises(ValueError, match='no "optimizer" section'):
        split_config(cfg)
    cfg = config("qst")
    cfg["zero_optimization"] = {"stage": 2}
    with pytest.raises(ValueError, match="stage 0 only"):
        split_config(cfg)
