"""Gradient clipping in both flows: the fused flow's budgets (qft_ds/optim/clipping.py) against the
stack flow's exact global clipping, a first-step spike, a mid-run spike, and the budgets' bound."""
import math
import random

import pytest
import torch

from qft_ds.nn import convert_model, quantized_weights
from qft_ds.optim.clipping import ClipBudgets

from test_qftlion import batch, setup


def momenta(model, opt):
    out = []
    for w in quantized_weights(model):
        st = opt.state[w.anchor]
        out.append(st["m_codes"].float() * st["m_scales"].repeat_interleave(256)[: w.numel])
    return torch.cat(out)


def weights(model):
    return torch.cat([w.dequantize().reshape(-1) for w in quantized_weights(model)])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def true_norm(make, x):
    dense = make()
    convert_model(dense, group_size=64, outlier_frac=0.0)
    dense(input_ids=x, labels=x).loss.backward()
    sq = sum(w.grad.pow(2).sum() for w in quantized_weights(dense))
    sq += sum(p.grad.pow(2).sum() for p in dense.parameters() if p.grad is not None)
    return sq.sqrt().item(), dense


def run(make, flow, clip, steps, spike_at=(), spike=100.0, mode="budget", seed=0, no_clip_at=(), use_backward=True):
    """Train `steps` steps; the loss (so every gradient) is `spike` times larger at the steps in spike_at.
    Returns the model, the optimizer and each step's (global norm, clipped norm)."""
    model, opt = setup(make, flow=flow, clip=clip, frac=0.0, lr=1e-3, seed=seed)
    opt.clip.mode = mode
    norms = []
    for s in range(steps):
        x = batch(seed=100 + s)
        loss = model(input_ids=x, labels=x).loss * (spike if s in spike_at else 1.0)
        opt.clip.max_norm = 0.0 if s in no_clip_at else clip
        if use_backward:
            opt.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
        norms.append((opt.prev_grad_norm, opt.prev_clipped_norm))
    return model, opt, norms


def test_first_step_is_clipped_exactly_in_both_flows(tiny_llama):
    x = batch(seed=100)
    n, dense = true_norm(tiny_llama, x)
    clip = n / 10
    g = quantized_weights(dense)[1].grad.reshape(-1)
    for flow in ("fused", "stack"):
        model, opt, norms = run(tiny_llama, flow, clip, steps=1)
        assert norms[0][0] == pytest.approx(n, rel=0.02)
        assert norms[0][1] == pytest.approx(clip, rel=0.02)
        w = quantized_weights(model)[1]
        st = opt.state[w.anchor]
        m = st["m_codes"].float() * st["m_scales"].repeat_interleave(256)[: w.numel]
        assert rel(m, 0.01 * (clip / n) * g) < 0.03  # the momentum took the clipped gradient


def test_first_step_spike_fused_matches_stack(tiny_llama):
    """Step 0's gradient is 100x the later ones. The fused flow measures step 0 with a norm pass and
    clips it exactly, so after N steps its int8 state matches the stack flow's within rounding noise;
    leaving step 0 unclipped (the old fused behaviour) lets the spike own the momentum."""
    normal, _ = true_norm(tiny_llama, batch(seed=101))
    clip = 2 * normal  # later steps are not clipped; step 0 (100x) is
    steps = 6
    stack = run(tiny_llama, "stack", clip, steps, spike_at={0})
    fused = run(tiny_llama, "fused", clip, steps, spike_at={0})
    unclipped = run(tiny_llama, "fused", clip, steps, spike_at={0}, no_clip_at={0})
    ms, mf, mu = (momenta(*r[:2]) for r in (stack, fused, unclipped))
    assert rel(mf, ms) < 0.05
    assert rel(mu, ms) > 0.5  # the test can tell: an unclipped first spike dominates the momentum
    assert rel(weights(fused[0]), weights(stack[0])) < 0.5 * rel(weights(unclipped[0]), weights(stack[0]))
    assert all(c <= clip * 1.0001 for _, c in fused[2])


def test_mid_run_spike_is_clipped_at_its_own_step(tiny_llama):
    """A 100x spike at step 3: the budgets from step 2 clip it at step 3 (no norm pass there), like the
    stack flow's exact clipping; the clipped norm never exceeds the limit."""
    normal, _ = true_norm(tiny_llama, batch(seed=101))
    clip = 2 * normal
    steps = 6
    stack = run(tiny_llama, "stack", clip, steps, spike_at={3})
    fused = run(tiny_llama, "fused", clip, steps, spike_at={3})
    assert fused[2][3][0] > 20 * clip  # the spike happened
    assert all(c <= clip * 1.0001 for _, c in fused[2])
    assert fused[2][3][1] > 0.8 * clip  # and was clipped to about the limit, not to nothing
    assert rel(momenta(*fused[:2]), momenta(*stack[:2])) < 0.1


def test_two_pass_mode_clips_every_step_exactly(tiny_llama):
    normal, _ = true_norm(tiny_llama, batch(seed=101))
    clip = normal / 3  # clipping active at every step
    fused = run(tiny_llama, "fused", clip, 4, mode="two_pass")
    assert all(c == pytest.approx(clip, rel=1e-3) for _, c in fused[2])
    stack = run(tiny_llama, "stack", clip, 4)
    assert rel(momenta(*fused[:2]), momenta(*stack[:2])) < 0.05


def test_plain_loss_backward_falls_back_to_size_budgets_loudly(tiny_llama, caplog):
    normal, _ = true_norm(tiny_llama, batch(seed=100))
    clip = normal / 10
    with caplog.at_level("WARNING", logger="qft_ds"):
        _, _, norms = run(tiny_llama, "fused", clip, 2, use_backward=False)
    assert "no reference norms" in caplog.text
    assert all(c <= clip * 1.0001 for _, c in norms)  # still bounded


def test_clip_references_survive_a_checkpoint(tiny_llama):
    normal, _ = true_norm(tiny_llama, batch(seed=101))
    model, opt, _ = run(tiny_llama, "fused", normal / 3, 2)
    sd = opt.state_dict()
    _, fresh = setup(tiny_llama, flow="fused", clip=normal / 3, frac=0.0)
    fresh.load_state_dict(sd)
    assert fresh.clip.refs == opt.clip.refs and fresh.clip.ready() and not fresh.clip.needs_norm_pass()


# -- the budgets themselves ---------------------------------------------------------------------------

def test_budgets_bound_the_clipped_norm_and_equal_global_clipping_when_the_shape_holds():
    rng = random.Random(0)
    for trial in range(200):
        k = rng.randint(1, 12)
        cb = ClipBudgets(1.0, [rng.randint(1, 1000) for _ in range(k)])
        refs = {i: rng.uniform(0.01, 5) for i in range(k)}
        cb.observe(refs)
        budgets = cb.budgets()
        assert math.isclose(sum(b * b for b in budgets), 1.0, rel_tol=1e-9)
        drifted = {i: r * rng.uniform(0.1, 10) * 10 ** rng.uniform(-2, 2) for i, r in refs.items()}
        assert cb.clipped_norm(drifted, budgets) <= 1.0 + 1e-9
        scale = 10 ** rng.uniform(-3, 3)  # same shape, any size: exactly global clipping
        same = {i: r * scale for i, r in refs.items()}
        n = math.sqrt(sum(v * v for v in same.values()))
        assert cb.clipped_norm(same, budgets) == pytest.approx(min(n, 1.0), rel=1e-5)


def test_budgets_without_references_are_by_size_and_bounded():
    cb = ClipBudgets(2.0, [100, 400, 1])
    assert cb.needs_norm_pass()
    b = cb.budgets()
    assert b[1] == pytest.approx(2 * b[0]) and sum(x * x for x in b) == pytest.approx(4.0)
    cb.observe({0: 1.0, 1: float("nan"), 2: 0.0})  # non-finite and zero norms give no reference
    assert cb.refs == [1.0, None, None] and cb.needs_norm_pass()
    with pytest.raises(ValueError, match="clip_mode"):
        ClipBudgets(1.0, [1], mode="previous")
    with pytest.raises(ValueError, match="reference norms"):
        cb.load_state_dict({"refs": [1.0]})
