"""ZeRO-3 sharded while converting (issue 16, item 3): on 2 gloo ranks, a sharded checkpoint streamed with
stage 3 leaves each rank only its slice of every weight's int8 state (about half, the two halves adding up to
the whole exactly), and training from it equals today's path, load whole then convert then shard, bit for bit."""
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import harness as H
from conftest import make_tiny_llama
from qft_ds.config import QFTConfig
from qft_ds.engine import build_optimizer
from qft_ds.nn import convert_model, quantized_weights, streaming


def _cfg(rounding: str) -> QFTConfig:
    cfg = QFTConfig(flow="fused", rounding=rounding, group_size=32, outlier_frac=0.02, block_size=64)
    cfg.zero_stage = 3
    return cfg


def _held(model) -> int:
    return sum(w.state_nbytes() for w in quantized_weights(model))


def _train(model, cfg, rank, world):
    opt = build_optimizer(model, cfg, {"lr": 2e-3, "weight_decay": 0.1})
    opt.shard()
    opt.init_state()
    losses = H.data_steps(model, opt, rank, world, steps=3)
    return losses, H.full_state(model, opt)


def _worker(rank, world, path, results):
    for rounding in ("sr", "ef"):
        cfg = _cfg(rounding)
        today = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        convert_model(today, group_size=cfg.group_size, outlier_frac=cfg.outlier_frac,
                      error_feedback=rounding == "ef")
        whole = _held(today)

        streamed = streaming.load_skeleton(path)
        streaming.convert_skeleton(streamed, cfg, device="cpu")
        held = _held(streamed)  # before the optimizer exists: conversion itself kept only the slice
        total = torch.tensor([held])
        dist.all_reduce(total)

        losses_today, state_today = _train(today, cfg, rank, world)
        losses_streamed, state_streamed = _train(streamed, cfg, rank, world)
        H.assert_same(state_today, state_streamed, f"rank {rank}, {rounding}: streamed vs today's ZeRO-3")
        assert losses_today == losses_streamed
        if rank == 0:
            results[rounding] = (held, int(total), whole)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp
    path = tmp_path_factory.mktemp("stream3") / "m"
    make_tiny_llama().save_pretrained(path, max_shard_size="40KB")
    assert streaming.is_sharded_checkpoint(path)
    with mp.Manager() as manager:
        out = manager.dict()
        H.spawn(_worker, str(path), out)
        return dict(out)


@pytest.mark.parametrize("rounding", ["sr", "ef"])
def test_each_rank_converts_only_its_half(results, rounding):
    held, total, whole = results[rounding]
    assert total == whole                      # the slices tile the whole state, nothing twice
    assert 0.4 < held / whole < 0.6, (held, whole)  # whole weight groups and momentum blocks per rank
