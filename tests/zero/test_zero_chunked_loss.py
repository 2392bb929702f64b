"""The chunked loss at ZeRO stage 3 on 2 gloo ranks: the head's int8 weight is a shard gathered when the
loss dequantizes it, and its one gradient is reduce-scattered like any weight's. Real forward/backward on
half the batch per rank, 3 steps, against the same 2-rank run without chunking (stack flow at stage 2:
the head's int8 buffer keeps only this rank's slice)."""
import pytest
import torch

import harness as H
from qft_ds.nn.chunked_loss import install_chunked_loss

RUNS = [(3, "fused"), (2, "stack")]


def _worker(rank, world, out):
    res = {}
    for stage, flow in RUNS:
        for chunk in (0, 5):
            model, opt = H.build(stage, flow, clip=0.0)
            if chunk:
                install_chunked_loss(model, chunk)
            losses = H.data_steps(model, opt, rank, world, 3)
            res[(stage, flow, chunk)] = (H.full_state(model, opt), losses)
    if rank == 0:
        torch.save(res, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_chunked") / "res.pt"
    H.spawn(_worker, str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stage,flow", RUNS)
def test_sharded_run_matches_unchunked(two_ranks, stage, flow):
    (want, want_losses), (got, got_losses) = two_ranks[(stage, flow, 0)], two_ranks[(stage, flow, 5)]
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    assert want.keys() == got.keys()
    codes = [k for k in want if k.endswith(".codes") or k.endswith(".m_codes")]
    assert codes
    differ = sum(int((got[k] != want[k]).sum()) for k in codes)
    total = sum(want[k].numel() for k in codes)
    assert differ <= total * 1e-4, f"{differ} of {total} int8 codes differ"
