"""Data parallel's overlap depth: how many weights' all-reduces the optimizer core keeps in flight inside
backward before it applies the oldest. Each weight's update is independent of the others', so the depth
changes when an update runs, never its bits."""
import sys

import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent / "zero"))
import harness as H  # noqa: E402

from qft_ds.optim.sharding import NoSharding  # noqa: E402


def _run(rank, world, out, depth, clip):
    model, opt = H.build(0, clip=clip)
    opt.sharding.overlap = depth
    seen = []
    finish = opt._finish
    opt._finish = lambda w, r: (seen.append(len(opt._pending)), finish(w, r))[1]
    def averaged(loss):  # clipping's norm pass, with the float gradients averaged as DeepSpeed's backward does
        loss.backward(retain_graph=True)
        for p in model.parameters():
            if p.grad is not None and not hasattr(p, "_qft_weight"):
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    H.data_steps(model, opt, rank, world, 3, backward=lambda loss: opt.before_backward(loss, averaged)
                 and loss.backward())
    state = H.full_state(model, opt)
    state["_max_in_flight"] = torch.tensor(max(seen))
    torch.save(state, f"{out}.{rank}")


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_the_depth_changes_no_bits(tmp_path, clip):
    states = {}
    for depth in (0, 1, 3):
        H.spawn(_run, str(tmp_path / f"d{depth}.pt"), depth, clip)
        states[depth] = [torch.load(tmp_path / f"d{depth}.pt.{r}") for r in range(2)]
    for depth, (r0, r1) in states.items():
        assert int(r0.pop("_max_in_flight")) == depth  # that many were in flight when the oldest was applied
        r1.pop("_max_in_flight")
        H.assert_same(r0, r1, f"depth {depth}: the two ranks")
    H.assert_same(states[1][0], states[0][0], "depth 1 against 0")
    H.assert_same(states[3][0], states[0][0], "depth 3 against 0")


def test_one_device_never_defers_and_bad_depth_is_an_error():
    assert NoSharding(overlap=4).overlap_depth == 0  # no process group: nothing to overlap
    with pytest.raises(ValueError, match="overlap"):
        NoSharding(overlap=-1)
