"""QFTLion and the two gradient flows on a tiny LLaMA."""
import io

import pytest
import torch

from qft_ds.config import QFTConfig
from qft_ds.engine import build_optimizer
from qft_ds.nn import convert_model, quantized_weights


def setup(make, flow="fused", rounding="sr", lr=1e-3, wd=0.1, seed=0, clip=0.0, group=64, frac=0.01, **kw):
    model = make(**kw)
    convert_model(model, group_size=group, outlier_frac=frac, error_feedback=rounding == "ef")
    cfg = QFTConfig(rounding=rounding, flow=flow, seed=seed, max_grad_norm=clip)
    return model, build_optimizer(model, cfg, {"lr": lr, "weight_decay": wd})


def batch(n=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, t), generator=g)


def train(model, opt, steps=3, gas=1, n=4):
    for s in range(steps):
        for k in range(gas):
            x = batch(n, seed=100 * s + k)
            (model(input_ids=x, labels=x).loss / gas).backward()
        opt.step()
        opt.zero_grad()


def snapshot(model, opt):
    out = {}
    for i, w in enumerate(quantized_weights(model)):
        out[f"w{i}"] = w.codes.clone()
        out[f"s{i}"] = w.scales.clone()
        out[f"o{i}"] = w.outlier_val.clone()
        st = opt.state[w.anchor]
        out[f"m{i}"] = st["m_codes"].clone()
        out[f"ms{i}"] = st["m_scales"].clone()
    return out


def test_same_seed_gives_bit_identical_int8_state(tiny_llama):
    a = setup(tiny_llama, seed=5)
    b = setup(tiny_llama, seed=5)
    c = setup(tiny_llama, seed=6)
    for m, o in (a, b, c):
        train(m, o)
    sa, sb, sc = snapshot(*a), snapshot(*b), snapshot(*c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the seed keys the rounding


def test_round_to_nearest_freezes_weights_where_sr_moves_them(tiny_llama):
    """The failure mode QFT exists to fix: at lr 1e-5 an update is ~1/50 of an int8 step."""
    moved = {}
    for rounding in ("rtn", "sr"):
        model, opt = setup(tiny_llama, rounding=rounding, lr=1e-5, wd=0.0, frac=0.0)
        before = [w.codes.clone() for w in quantized_weights(model)]
        train(model, opt, steps=4)
        after = [w.codes for w in quantized_weights(model)]
        moved[rounding] = sum((a != b).sum().item() for a, b in zip(after, before)) / sum(b.numel() for b in before)
    assert moved["rtn"] == 0.0
    assert moved["sr"] > 0.005


def test_fused_and_stack_give_the_same_update_for_one_micro_batch(tiny_llama):
    """Stack mode rounds each gradient to int8 before the update. Where |g| < half an int8 gradient step,
    that rounds to 0 and sign(c) = 0 on the first step, so a few percent of elements may differ; the
    stochastic-rounding draws are shared, so every other weight code is identical."""
    f = setup(tiny_llama, flow="fused", frac=0.0)
    s = setup(tiny_llama, flow="stack", frac=0.0)
    train(*f, steps=1)
    train(*s, steps=1)
    sf, ss = snapshot(*f), snapshot(*s)
    diff = sum((sf[k] != ss[k]).sum().item() for k in sf if k.startswith("w"))
    total = sum(sf[k].numel() for k in sf if k.startswith("w"))
    assert diff / total < 0.03
    for k in (k for k in sf if k.startswith("m") and not k.startswith("ms")):
        i = k[1:]
        mf = sf[k].float() * sf[f"ms{i}"].repeat_interleave(256)[: sf[k].numel()]
        ms = ss[k].float() * ss[f"ms{i}"].repeat_interleave(256)[: ss[k].numel()]
        assert ((mf - ms).norm() / mf.norm()).item() < 0.03


def test_accumulating_k_micro_batches_matches_one_big_batch(tiny_llama):
    """The int8 stack buffer after k micro-batches holds the big-batch gradient up to int8 rounding."""
    model, opt = setup(tiny_llama, flow="stack", frac=0.0)
    dense = tiny_llama()
    convert_model(dense, group_size=64, outlier_frac=0.0)  # no optimizer: exact fp32 grads kept
    x = batch(8)
    dense(input_ids=x, labels=x).loss.backward()
    for k in range(4):
        xk = x[2 * k:2 * k + 2]
        (model(input_ids=xk, labels=xk).loss / 4).backward()
    for w, wd in zip(quantized_weights(model), quantized_weights(dense)):
        acc = opt.flow._buffers[w].dequantize()
        exact = wd.grad.reshape(-1)
        assert ((acc - exact).norm() / exact.norm()).item() < 0.02
    assert opt.flow.gradient_nbytes() < sum(w.numel for w in quantized_weights(model)) * 1.05  # ~1 byte/param


def test_tied_weight_updates_once_per_step(tiny_llama):
    model, opt = setup(tiny_llama, frac=0.0)
    calls = []
    real = opt.flow.apply_fn
    opt.flow.apply_fn = lambda w, g: (calls.append(id(w)), real(w, g))
    train(model, opt, steps=2)
    assert len(calls) == 2 * len(quantized_weights(model))
    assert len(set(calls)) == len(quantized_weights(model))


def test_state_dict_round_trip_continues_identically(tiny_llama):
    a = setup(tiny_llama)
    train(*a, steps=2)
    b = setup(tiny_llama)
    buf = io.BytesIO()  # through bytes, as on disk: in memory the two would share tensors
    torch.save({"model": a[0].state_dict(), "optim": a[1].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b[0].load_state_dict(saved["model"])
    b[1].load_state_dict(saved["optim"])
    assert all(st["m_codes"].dtype == torch.int8 for st in b[1].state.values() if "m_codes" in st)
    assert b[1].step_count == 2
    for m, o in (a, b):
        x = batch(seed=99)
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    sa, sb = snapshot(*a), snapshot(*b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_state_is_at_most_2_3_bytes_per_quantized_param(tiny_llama):
    model = tiny_llama(hidden=256, vocab=512)
    cfg = QFTConfig()  # the default mode: fused, SR, 1% outliers, no error feedback
    convert_model(model, group_size=cfg.group_size, outlier_frac=cfg.outlier_frac)
    opt = build_optimizer(model, cfg, {"lr": 1e-4})
    opt.init_state()
    n = sum(w.numel for w in quantized_weights(model))
    counted = 0
    for w in quantized_weights(model):
        counted += sum(t.untyped_storage().nbytes() for t in (w.codes, w.scales, w.outlier_idx, w.outlier_val))
        counted += sum(t.untyped_storage().nbytes() for t in opt.state[w.anchor].values())
    assert counted / n <= 2.3
    assert opt.state_nbytes()["bytes_per_quantized_param"] == pytest.approx(counted / n)


def test_loss_falls(tiny_llama):
    model, opt = setup(tiny_llama, lr=2e-3)
    x = batch()
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
