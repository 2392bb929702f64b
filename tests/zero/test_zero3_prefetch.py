"""ZeRO stage 3's gather prefetch on 2 gloo ranks: a tiny LLaMA trained with gradient checkpointing (each
weight gathered for its forward, its recompute, and the LM head for its backward) gives the bits of the
same run with every gather made at its use (prefetch depth 0): weights, outliers, momentum, float
parameters and losses. In a normal run no use misses the traced order after the first step; when the
order is broken on purpose (two layers swapped for one step) the misses are counted and training stays
exact."""
import pytest
import torch

import harness as H
from qft_ds.nn.qmodules import mark_checkpointed
from qft_ds.zero.prefetch import PREFETCH_DEPTH

STEPS = 6
SWAP_AT = 2  # steps 0-based: the broken run swaps layers 0 and 1 for this step only


def _run(rank, world, depth, clip, swap, refresh=0):
    model, opt = H.build(3, "fused", clip=clip, outlier_refresh=refresh)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mark_checkpointed(model)
    pf = opt.sharding.prefetcher
    pf.depth = depth
    layers = model.model.layers
    losses, misses, prefetched = [], [], []
    for step in range(STEPS):
        if swap and step in (SWAP_AT, SWAP_AT + 1):  # swapped for one step, then back
            layers[0], layers[1] = layers[1], layers[0]
        losses += H.data_steps(model, opt, rank, world, 1, backward=opt.backward)
        misses.append(pf.misses)
        prefetched.append(pf.prefetched - sum(prefetched))  # this step's
    stats = pf.stats()  # before full_state, whose gathers are uses too
    return {"state": H.full_state(model, opt), "losses": losses, "misses": misses, "prefetched": prefetched,
            "stats": stats}


def _worker(rank, world, out):
    res = {}
    for name, clip, swap, refresh in (("normal", 1.0, False, 0), ("broken", 0.0, True, 0),
                                      ("refresh", 0.0, False, 2)):
        for depth in (PREFETCH_DEPTH, 0):
            res[(name, depth)] = _run(rank, world, depth, clip, swap, refresh)
    if rank == 0:
        torch.save(res, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefetch") / "res.pt"
    H.spawn(_worker, str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("name", ["normal", "broken", "refresh"])
def test_prefetch_gives_the_bits_of_gathering_at_each_use(runs, name):
    on, off = runs[(name, PREFETCH_DEPTH)], runs[(name, 0)]
    H.assert_same(on["state"], off["state"], f"{name}: prefetch vs none")
    assert on["losses"] == off["losses"]
    assert len(set(on["losses"])) > 1  # the weights moved
    assert off["stats"]["prefetched"] == 0


def test_a_normal_run_follows_the_trace_after_the_first_step(runs):
    on = runs[("normal", PREFETCH_DEPTH)]
    assert on["misses"] == [0] * STEPS
    # the first step also ran clipping's norm-only backward: the second keeps the part of the trace it used
    assert on["stats"]["cuts"] == 1
    # step 1 is traced; from step 2 on, every use but the step's first comes from a gather started ahead
    first, *rest = on["prefetched"]
    assert first == 0 and rest[0] > 0 and rest == [rest[0]] * len(rest)


def test_a_broken_order_is_counted_and_traced_again(runs):
    on, normal = runs[("broken", PREFETCH_DEPTH)], runs[("normal", PREFETCH_DEPTH)]["prefetched"]
    # the swapped step misses once (the rest of it gathers at each use), the next one (swapped back) is
    # traced, and the steps after it are prefetched as before
    assert on["misses"] == [0] * SWAP_AT + [1] * (STEPS - SWAP_AT)
    p = on["prefetched"]
    assert p[1] == normal[1] and p[SWAP_AT] < p[1] and p[SWAP_AT + 1] == 0
    assert p[SWAP_AT + 2:] == [p[1]] * (STEPS - SWAP_AT - 2)


def test_outlier_reselection_inside_step_restarts_the_trace_without_a_miss(runs):
    on = runs[("refresh", PREFETCH_DEPTH)]
    # every 2nd step re-selects outliers, gathering every weight in order after the backward
    assert on["misses"] == [0] * STEPS and on["stats"]["cuts"] == 0 and on["stats"]["restarts"] >= 2
    # (steps 2, 4 and 6 do, counted from 1): their re-selection pass is prefetched too, after its first use
    p, plain = on["prefetched"], runs[("broken", PREFETCH_DEPTH)]["prefetched"][1]
    assert p[2] == p[4] == plain and p[1] == p[3] == p[5] > plain


def _train_worker(rank, world, cfg, model, text, out):
    """train.py at stage 3 through DeepSpeed's engine (its evaluation before step 1, clipping's norm pass);
    the prefetcher's counters after each optimizer step are recorded by a spy on end_step."""
    import json

    import test_zero_train as T
    from qft_ds.zero import prefetch
    seen, real = [], prefetch.GatherPrefetcher.end_step

    def end_step(self):
        real(self)
        seen.append(self.stats())
    prefetch.GatherPrefetcher.end_step = end_step
    try:
        T.train.main(T._argv(cfg, model, text, f"{out}/run"))
    finally:
        prefetch.GatherPrefetcher.end_step = real
    if rank == 0:
        (out / "stats.json").write_text(json.dumps(seen))


def test_train_py_at_stage_3_prefetches_from_step_2_without_a_miss(tmp_path):
    import json

    import test_zero_train as T
    text = T.write_model_and_corpus(tmp_path)
    H.spawn(_train_worker, str(T._config(tmp_path, 2)), str(tmp_path / "model"), str(text), tmp_path)
    seen = json.loads((tmp_path / "stats.json").read_text())
    assert len(seen) == T.STEPS and all(s["misses"] == 0 for s in seen)
    per_step = [b["prefetched"] - a["prefetched"] for a, b in zip(seen, seen[1:])]
    assert seen[0]["prefetched"] == 0 and per_step[0] > 0 and per_step == [per_step[0]] * len(per_step)
