"""int4 momentum (momentum_bits 4) under ZeRO: 2 gloo ranks hold one device's bytes, and its sharded
checkpoints resume exactly on any world size and stage, consolidate, and refuse an int8 run by name.

As in test_zero_sharding.py, the same gradient is injected on both ranks, so the mean over ranks is that
gradient bit for bit and any difference from one device would be the sharding's (or the checkpoint's).
Momentum blocks of 64 elements make many shards cut mid-weight; each starts on a whole byte.
"""
import pytest
import torch
from safetensors.torch import load_file

import harness as H
from qft_ds import checkpoint
from qft_ds.nn import quantized_weights

EXACT = [(1, "fused"), (3, "fused"), (2, "stack")]


def _worker(rank, world, tmp):
    res = {}
    for stage, flow in EXACT:
        model, opt = H.build(stage, flow, clip=1e9, momentum_bits=4)
        H.inject_steps(model, opt, 3)
        res[(stage, flow)] = (H.full_state(model, opt), opt.state_nbytes())
    # A: stage 2 saves after 2 steps and runs on to 4; E: stage 3 resumes A on 2 ranks
    model, opt = H.build(2, momentum_bits=4)
    H.inject_steps(model, opt, 2)
    checkpoint.save(f"{tmp}/a", model, opt, step=2)
    H.inject_steps(model, opt, 2, start=2)
    res["a"] = H.full_state(model, opt)
    model, opt = H.build(3, momentum_bits=4)
    checkpoint.load(f"{tmp}/a", model, opt)
    H.inject_steps(model, opt, 2, start=2)
    res["e"] = H.full_state(model, opt)
    if rank == 0:
        torch.save(res, f"{tmp}/res.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zm4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: reproducible CPU matmuls
    try:
        model, opt = H.build(0, momentum_bits=4)  # C: one device, plain checkpoint at step 2, on to 4
        H.inject_steps(model, opt, 2)
        checkpoint.save(tmp / "c", model, opt, step=2)
        H.inject_steps(model, opt, 2, start=2)
        final_c = H.full_state(model, opt)
    finally:
        torch.set_num_threads(threads)
    H.spawn(_worker, str(tmp))
    return tmp, final_c, torch.load(tmp / "res.pt", weights_only=False)


@pytest.mark.parametrize("stage,flow", EXACT)
def test_two_ranks_hold_one_device_bytes(run, stage, flow):
    state, nbytes = run[2][(stage, flow)]
    model, opt = H.build(0, flow, clip=1e9, momentum_bits=4)
    H.inject_steps(model, opt, 3)
    one = H.full_state(model, opt)
    H.assert_same(state, one, f"stage {stage} {flow}, int4 momentum")
    assert all(state[k].dtype == torch.uint8 for k in state if k.endswith("m_codes"))
    # each rank holds about half of the packed momentum
    m_bytes = sum(opt.state[w.anchor]["m_codes"].numel() for w in quantized_weights(model))
    assert nbytes["momentum_bits"] == 4
    assert nbytes["quantized_bytes"] <= opt.state_nbytes()["quantized_bytes"] - 0.45 * m_bytes


def test_sharded_int4_checkpoints_resume_exactly_anywhere(run):
    tmp, final_c, res = run
    H.assert_same(res["a"], final_c, "2 ranks stage 2, unbroken")
    H.assert_same(res["e"], final_c, "2-rank stage-2 checkpoint resumed on 2 ranks, stage 3")
    for stage in (0, 3):
        model, opt = H.build(stage, momentum_bits=4)
        checkpoint.load(tmp / "a", model, opt)
        H.inject_steps(model, opt, 2, start=2)
        H.assert_same(H.full_state(model, opt), final_c, f"2-rank checkpoint resumed on 1 rank, stage {stage}")
    meta = checkpoint.read_meta(tmp / "a" / "checkpoint-2")
    assert meta["optimizer"]["qft"]["momentum_bits"] == 4
    for r, name in enumerate(("rank-00000", "rank-00001")):  # each rank wrote its slice's bytes
        shard = load_file(tmp / "a" / "checkpoint-2" / "zero" / f"{name}.safetensors")
        for prefix, bounds in meta["zero"]["bounds"].items():
            lo, hi = bounds[r]
            assert shard[f"{prefix}.m_codes"].dtype == torch.uint8
            assert shard[f"{prefix}.m_codes"].numel() == -(-(hi - lo) // 2)


def test_consolidated_int4_checkpoint_equals_the_one_device_one(run, tmp_path):
    from qft_ds.zero.consolidate import consolidate
    tmp, final_c, _ = run
    consolidate(tmp / "a", tmp_path / "plain")
    a, b = (load_file(p / "optimizer.safetensors") for p in (tmp_path / "plain", tmp / "c" / "checkpoint-2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.dtype == torch.uint8 for v in a.values())


@pytest.mark.parametrize("src", ["a", "c"])  # sharded and plain
def test_an_int8_run_refuses_int4_momentum_by_name(run, src):
    model, opt = H.build(0)
    before = H.full_state(model, opt)
    with pytest.raises(ValueError, match=r"'qft.momentum_bits' 4\).*'qft.momentum_bits' 8"):
        checkpoint.load(run[0] / src, model, opt)
    H.assert_same(H.full_state(model, opt), before, "a refused load writes nothing")
