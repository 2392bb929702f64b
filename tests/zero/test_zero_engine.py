"""ZeRO through the DeepSpeed entry point: qft_ds.initialize with "zero_optimization": {"stage": N}."""
import json
from pathlib import Path

import pytest
import torch

import harness as H
from conftest import make_tiny_llama
from qft_ds.engine import split_config

ROOT = Path(__file__).resolve().parents[2]


def _config(stage, gas):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": 0.0,
            "optimizer": {"type": "QFTLion", "params": {"lr": 2e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage},
            "qft": {"group_size": 32, "block_size": 64, "outlier_frac": 0.02, "backend": "torch"},
            "steps_per_print": 10**9}


def _worker(rank, world, out):
    import qft_ds
    res = {}
    for stage, gas in ((0, 1), (3, 1), (0, 2), (1, 2)):
        torch.manual_seed(0)
        engine, opt, _, _ = qft_ds.initialize(model=make_tiny_llama(), config=_config(stage, gas))
        assert type(opt).__name__ == "QFTLion" and opt.zero_stage == stage  # ZeRO is QFTLion's strategy
        assert engine.zero_optimization_stage() == 0  # DeepSpeed's own ZeRO stays off
        g = torch.Generator().manual_seed(1)
        for _ in range(3 * gas):
            x = torch.randint(0, 128, (8, 16), generator=g)[rank * 4:(rank + 1) * 4]
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        res[(stage, gas)] = H.full_state(engine.module, opt)
    # a model initialised differently on each rank: initialize broadcasts rank 0's int8 weights
    torch.manual_seed(rank)
    engine, opt, _, _ = qft_ds.initialize(model=make_tiny_llama(seed=rank), config=_config(0, 1))
    torch.save(H.full_state(engine.module, opt), f"{out}.rank{rank}")
    if rank == 0:
        torch.save(res, out)


def test_engine_stages_match_stage_0_on_two_ranks(tmp_path):
    H.spawn(_worker, str(tmp_path / "res.pt"))
    res = torch.load(tmp_path / "res.pt", weights_only=False)
    # 2 ranks: reduce-scatter sums the same two numbers as all-reduce, so the bits are stage 0's
    H.assert_same(res[(3, 1)], res[(0, 1)], "engine stage 3 vs stage 0 (fused)")
    H.assert_same(res[(1, 2)], res[(0, 2)], "engine stage 1 vs stage 0 (stack, 2 micro-batches)")
    r0, r1 = (torch.load(f"{tmp_path / 'res.pt'}.rank{r}", weights_only=False) for r in (0, 1))
    quantized = [k for k in r0 if k.split(".")[-1] in ("codes", "scales", "oidx", "oval")]
    H.assert_same({k: r0[k] for k in quantized}, {k: r1[k] for k in quantized}, "int8 weights after broadcast")


def test_split_config_hands_deepspeed_stage_0():
    cfg, _, ds = split_config(_config(2, 1))
    assert cfg.zero_stage == 2 and ds["zero_optimization"]["stage"] == 0
    for bad, match in (({"stage": 4}, "must be 0, 1, 2 or 3"),
                       ({"stage": 3, "offload_param": {"device": "cpu"}}, "offloading is not supported")):
        with pytest.raises(ValueError, match=match):
            split_config({**_config(0, 1), "zero_optimization": bad})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_zero_configs(stage):
    ds = json.loads((ROOT / "ds_configs" / f"qft_zero{stage}.json").read_text())
    cfg, _, out = split_config(ds, world_size=2)
    assert cfg.zero_stage == stage and out["zero_optimization"]["stage"] == 0
