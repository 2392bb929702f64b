"""int4 Lion momentum ("qft": {"momentum_bits": 4}) in QFTLion: the config key, the state and its bytes,
training in both flows, and state-dict resume."""
import io

import pytest
import torch

from qft_ds.config import QFTConfig
from qft_ds.engine import build_optimizer
from qft_ds.nn import convert_model, quantized_weights
from qft_ds.ops import reference as ref


def setup(make, bits=4, flow="fused", lr=2e-3, seed=0, **kw):
    model = make(**kw)
    convert_model(model, group_size=64, outlier_frac=0.01)
    cfg = QFTConfig(flow=flow, seed=seed, momentum_bits=bits, gradient_accumulation_steps=2 if flow == "stack" else 1)
    return model, build_optimizer(model, cfg, {"lr": lr, "weight_decay": 0.1})


def batch(n=4, t=16, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def run(model, opt, steps, gas=1, start=0):
    losses = []
    for s in range(start, start + steps):
        for k in range(gas):
            x = batch(seed=100 * s + k)
            loss = model(input_ids=x, labels=x).loss
            (loss / gas).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def state(model, opt):
    out = {}
    for i, w in enumerate(quantized_weights(model)):
        st = opt.state[w.anchor]
        out.update({f"{i}.codes": w.codes.clone(), f"{i}.scales": w.scales.clone(),
                    f"{i}.oval": w.outlier_val.clone(), f"{i}.m_codes": st["m_codes"].clone(),
                    f"{i}.m_scales": st["m_scales"].clone()})
    return out


@pytest.mark.parametrize("section,match", [({"momentum_bits": 16}, "'qft.momentum_bits' must be 4 or 8"),
                                           ({"momentum_bits": "4"}, "'qft.momentum_bits' must be an integer"),
                                           ({"momentum_bits": 4, "block_size": 255}, "block_size' must be even"),
                                           ({"method": "peqa", "momentum_bits": 4}, "applies to method qft")])
def test_the_config_key_takes_4_or_8_only(section, match):
    with pytest.raises(ValueError, match=match):
        QFTConfig.from_dict(section)
    assert QFTConfig.from_dict({"momentum_bits": 4}).momentum_bits == 4
    assert QFTConfig().momentum_bits == 8  # int8 stays the default


def test_int4_state_is_packed_and_counted(tiny_llama):
    """Codes two per byte (uint8), the int8 block scales; state_nbytes counts the storage, so it falls by
    exactly the codes saved against int8 momentum."""
    m4, o4 = setup(tiny_llama, bits=4)
    m8, o8 = setup(tiny_llama, bits=8)
    for o in (o4, o8):
        o.init_state()
    saved = 0
    for w4, w8 in zip(quantized_weights(m4), quantized_weights(m8)):
        s4, s8 = o4.state[w4.anchor], o8.state[w8.anchor]
        assert s4["m_codes"].dtype == torch.uint8 and s4["m_codes"].numel() == -(-w4.numel // 2)
        assert s8["m_codes"].dtype == torch.int8 and s8["m_codes"].numel() == w8.numel
        assert s4["m_scales"].shape == s8["m_scales"].shape
        saved += s8["m_codes"].numel() - s4["m_codes"].numel()
    n4, n8 = o4.state_nbytes(), o8.state_nbytes()
    assert (n4["momentum_bits"], n8["momentum_bits"]) == (4, 8)
    assert n8["quantized_bytes"] - n4["quantized_bytes"] == saved
    assert n4["bytes_per_quantized_param"] < n8["bytes_per_quantized_param"] - 0.49


@pytest.mark.parametrize("flow,gas", [("fused", 1), ("stack", 2)])
def test_loss_falls_with_int4_momentum(tiny_llama, flow, gas):
    model, opt = setup(tiny_llama, flow=flow)
    x = batch()
    losses = []
    for _ in range(15):
        for _ in range(gas):
            loss = model(input_ids=x, labels=x).loss
            (loss / gas).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for w in quantized_weights(model):  # the momentum is live, in range, and decodes to finite values
        st = opt.state[w.anchor]
        q = ref.unpack_int4(st["m_codes"], w.numel)
        assert q.abs().max() <= 7 and (q != 0).any()
        assert torch.isfinite(opt.momentum.dequantize(st, w.numel)).all()


def test_int4_momentum_tracks_the_fp32_ema(tiny_llama):
    """After some steps, the int4 momentum is within a few int4 steps of an fp32 EMA of the same gradients
    (unbiased rounding: the error does not accumulate), a loose but real check of what Lion reads."""
    model, opt = setup(tiny_llama)
    ema, grads = {}, {}
    real = opt.flow.apply_fn

    def capture(w, g):  # each weight's gradient as the flow hands it to the update
        grads[id(w)] = g.reshape(-1).float().clone()
        return real(w, g)
    opt.flow.apply_fn = capture
    for s in range(6):
        grads.clear()
        run(model, opt, 1, start=s)
        for w in quantized_weights(model):
            ema[id(w)] = 0.99 * ema.get(id(w), 0) + 0.01 * grads[id(w)]
    for w in quantized_weights(model):
        st = opt.state[w.anchor]
        m = opt.momentum.dequantize(st, w.numel)
        step = st["m_scales"].repeat_interleave(opt.block_size)[: w.numel]
        # six steps of unbiased rounding: the error's spread grows like sqrt(steps), not steps
        assert ((m - ema[id(w)]).abs() <= 6 * step + 1e-12).all()
        assert ((m - ema[id(w)]).norm() / ema[id(w)].norm()).item() < 0.5


def test_state_dict_resume_is_bit_exact_and_refuses_another_width(tiny_llama):
    a = setup(tiny_llama)
    run(*a, 2)
    buf = io.BytesIO()  # through bytes, as on disk: in memory the two would share tensors
    torch.save({"model": a[0].state_dict(), "optim": a[1].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["optim"]["qft"]["momentum_bits"] == 4
    b = setup(tiny_llama)
    b[0].load_state_dict(saved["model"])
    b[1].load_state_dict(saved["optim"])
    assert all(st["m_codes"].dtype == torch.uint8 for st in b[1].state.values() if "m_codes" in st)
    run(*a, 2, start=2)
    run(*b, 2, start=2)
    sa, sb = state(*a), state(*b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = setup(tiny_llama, bits=8)
    with pytest.raises(ValueError, match=r"'qft.momentum_bits' 4\).*'qft.momentum_bits' 8"):
        c[1].load_state_dict(saved["optim"])
