"""A non-finite loss or gradient never reaches the int8 weights or momentum; every skip is counted."""
import json
from pathlib import Path

import pytest
import torch

import qft_ds
import qft_ds.nn.qmodules as qmodules
from qft_ds.checkpoint import state_hash
from qft_ds.nn import quantized_weights

ROOT = Path(__file__).resolve().parents[1]


def make_engine(tiny_llama, gas=1):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["scheduler"]["params"].update(total_num_steps=20, warmup_num_steps=4)
    cfg["gradient_accumulation_steps"] = gas
    engine, opt, _, sched = qft_ds.initialize(model=tiny_llama(tie=False), config=cfg)
    return engine, opt


def batch(i=0):
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))


def micro_step(engine, x, nan_loss=False):
    loss = engine(input_ids=x, labels=x).loss
    if nan_loss:
        loss = loss * float("nan")
    engine.backward(loss)
    engine.step()


def weight_state(opt, w):
    st = opt.state[w.anchor]
    return [t.clone() for t in (w.codes, w.scales, w.outlier_val, st["m_codes"], st["m_scales"])]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def nan_grad_for(monkeypatch):
    """Make the gradient delivered for one HybridWeight NaN (others untouched)."""
    def arm(target):
        real = qmodules.deliver

        def deliver(weight, grad, uses=1):
            if weight is target:
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
            real(weight, grad, uses)
        monkeypatch.setattr(qmodules, "deliver", deliver)
    return arm


@pytest.mark.parametrize("gas", [1, 2])
def test_nonfinite_loss_skips_the_step(tiny_llama, gas):
    engine, opt = make_engine(tiny_llama, gas)
    for k in range(gas):  # one good step
        micro_step(engine, batch(k))
    before, lr, steps = state_hash(engine.module, opt), opt.param_groups[0]["lr"], opt.step_count
    for k in range(gas):  # stack: the good first micro-batch is already in the int8 buffers
        micro_step(engine, batch(2 + k), nan_loss=(k == gas - 1))
    assert state_hash(engine.module, opt) == before         # nothing written, momentum included
    assert opt.step_count == steps                           # the SR key does not advance
    assert opt.param_groups[0]["lr"] == lr                   # DeepSpeed did not step the scheduler
    assert opt.skipped_steps == 1 and engine.skipped_steps == 1 and opt.overflow
    for k in range(gas):
        micro_step(engine, batch(5 + k))
    assert state_hash(engine.module, opt) != before and not opt.overflow  # training goes on


def test_stack_nonfinite_gradient_skips_the_whole_step(tiny_llama, nan_grad_for):
    engine, opt = make_engine(tiny_llama, gas=2)
    micro_step(engine, batch(0))
    micro_step(engine, batch(1))
    before = state_hash(engine.module, opt)
    nan_grad_for(engine.module.model.layers[1].mlp.down_proj.qweight)
    micro_step(engine, batch(2))
    micro_step(engine, batch(3))
    assert state_hash(engine.module, opt) == before
    assert opt.skipped_steps == 1 and engine.skipped_steps == 1 and opt.step_count == 1


def test_stack_nonfinite_float_gradient_skips_the_whole_step(tiny_llama):
    engine, opt = make_engine(tiny_llama, gas=2)
    norm = engine.module.model.norm.weight
    norm.register_hook(lambda g: g * float("inf"))
    before = state_hash(engine.module, opt)
    micro_step(engine, batch(0))
    micro_step(engine, batch(1))
    assert state_hash(engine.module, opt) == before and opt.skipped_steps == 1


def test_fused_nonfinite_gradient_leaves_that_weight_unwritten(tiny_llama, nan_grad_for):
    engine, opt = make_engine(tiny_llama)
    micro_step(engine, batch(0))  # step 0 sets prev_grad_norm
    bad = engine.module.model.layers[0].self_attn.q_proj.qweight
    good = engine.module.model.layers[1].mlp.up_proj.qweight
    bad0, good0 = weight_state(opt, bad), weight_state(opt, good)
    nan_grad_for(bad)
    micro_step(engine, batch(1))
    assert same(weight_state(opt, bad), bad0)          # int8 weight and momentum untouched
    assert not same(weight_state(opt, good), good0)    # the rest of the step happened
    assert opt.partial_steps == 1 and opt.nonfinite_tensors == 1 and opt.skipped_steps == 0
    assert opt.step_count == 2 and opt.prev_grad_norm is not None and torch.isfinite(torch.tensor(opt.prev_grad_norm))
    assert engine.skipped_steps == 0


@pytest.fixture
def host_reads(monkeypatch):
    """Count the calls that read a tensor's value on the host (each one is a host sync on a GPU). The CPU
    reference of the Lion kernel reads the finite flag on the host; the kernel it stands for reads it on
    the device, so its reads are not counted."""
    import traceback
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if not any(f.filename.endswith("ops/reference.py") for f in traceback.extract_stack(limit=8)):
                calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_fused_step_reads_the_device_twice(tiny_llama, host_reads):
    """The loss check before backward (and the norm pass's one read at step 0) and one read for all of
    step()'s checks; none inside backward."""
    engine, opt = make_engine(tiny_llama)
    for i in range(2):  # the second step also clips with the first one's norm
        loss = engine(input_ids=batch(i), labels=batch(i)).loss
        host_reads.clear()
        engine.backward(loss)
        # check_loss, and at step 0 the clipping norm pass's one read; the per-weight updates read nothing
        assert host_reads == (["__bool__", "tolist"] if i == 0 and opt.clip.active else ["__bool__"])
        opt_reads = []
        real_step = opt.step

        def step(*a, **k):
            n = len(host_reads)
            out = real_step(*a, **k)
            opt_reads.append(host_reads[n:])
            return out
        opt.step = step
        engine.step()
        opt.step = real_step
        assert opt_reads == [["tolist"]]  # every check of the step in one read
    assert opt.step_count == 2 and opt.skipped_steps == 0 and opt.prev_grad_norm > 0


def test_nan_loss_with_finite_gradients_skips_the_step(tiny_llama):
    """A batch whose labels are all ignored has a 0/0 = NaN loss but zero, finite gradients: Lion would
    still move every weight by momentum and weight decay, so the step must be skipped before backward."""
    engine, opt = make_engine(tiny_llama)
    micro_step(engine, batch(0))  # momentum is non-zero now
    before, steps = state_hash(engine.module, opt), opt.step_count
    x = batch(1)
    loss = engine(input_ids=x, labels=torch.full_like(x, -100)).loss
    assert torch.isnan(loss)
    engine.backward(loss)
    engine.step()
    assert state_hash(engine.module, opt) == before and opt.step_count == steps
    assert opt.skipped_steps == 1 and engine.skipped_steps == 1


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", float("inf")), ("lr", 1e999),
                                       ("weight_decay", float("nan")), ("weight_decay", 1e999), ("lr", -1.0)])
def test_nonfinite_hyperparameter_in_the_config_is_refused_by_name(tiny_llama, key, value):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"][key] = value
    with pytest.raises(ValueError, match=f"optimizer.params.{key}"):
        qft_ds.initialize(model=tiny_llama(), config=cfg)


def test_a_schedule_that_writes_nan_is_refused_before_anything_is_written(tiny_llama):
    """The LR scheduler writes lr into the param groups each step: a NaN there stops the run at that step,
    naming it, before the fused flow writes any weight."""
    engine, opt = make_engine(tiny_llama)
    micro_step(engine, batch(0))
    before = [w.codes.clone() for w in quantized_weights(engine.module)]
    mom = [opt.state[w.anchor]["m_codes"].clone() for w in quantized_weights(engine.module)]
    for g in opt.param_groups:
        g["lr"] = float("nan")
    with pytest.raises(ValueError, match="param group 0 at step 1.*lr"):
        micro_step(engine, batch(1))
    assert all(torch.equal(a, w.codes) for a, w in zip(before, quantized_weights(engine.module)))
    assert all(torch.equal(a, opt.state[w.anchor]["m_codes"]) for a, w in zip(mom, quantized_weights(engine.module)))
