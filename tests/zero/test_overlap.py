"""Fused flow under ZeRO: each weight's reduce-scatter runs while the next layer's backward does, and
the weight is updated one hook later (or at step()). One process, world size 1: the same code path."""
import torch

import harness as H
from qft_ds.flow import deliver
from qft_ds.nn import quantized_weights


def test_update_lands_one_hook_later_and_step_flushes_the_last():
    model, opt = H.build(1, "fused", clip=0.0)
    weights = [w for w in reversed(quantized_weights(model)) if w.n_uses == 1][:2]
    before = [w.codes.clone() for w in weights]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(w.shape, generator=g) for w in weights]
    deliver(weights[0], grads[0].clone())
    assert torch.equal(weights[0].codes, before[0]) and [p[0] for p in opt._pending] == [weights[0]]  # in flight
    deliver(weights[1], grads[1].clone())
    assert not torch.equal(weights[0].codes, before[0])  # applied at the next hook
    assert torch.equal(weights[1].codes, before[1]) and [p[0] for p in opt._pending] == [weights[1]]
    opt.step()
    assert not opt._pending and not torch.equal(weights[1].codes, before[1])
    expected = sum(gr.double().square().sum() for gr in grads).sqrt().item()
    assert len(opt._norms) == 0 and abs(opt.prev_grad_norm - expected) < 1e-5 * expected
