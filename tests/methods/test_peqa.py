"""PEQA through the engine: only scales move (codes bit for bit), the loss falls, exports round-trip."""
import json
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds import checkpoint
from qft_ds.cli import main
from qft_ds.methods import load_peqa
from qft_ds.nn.lowbit import LowBitLinear, lowbit_modules

ROOT = Path(__file__).resolve().parents[2]


def peqa_config(lr=2e-2, steps=20, **qft):
    cfg = json.loads((ROOT / "ds_configs" / "peqa.json").read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=1)
    cfg["bf16"] = {"enabled": False}  # fp32 compute: exact comparisons below
    cfg["qft"].update(qft)
    return cfg


def batch(i=0, vocab=128):
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(i))


def train(engine, steps, vocab=128):
    losses = []
    for i in range(steps):
        x = batch(i % 2, vocab)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bits,group_size", [(4, 16), (3, 0)])
def test_only_scales_train_codes_unchanged_and_loss_falls(tiny_llama, bits, group_size):
    model = tiny_llama()
    engine, opt, _, _ = qft_ds.initialize(model=model, config=peqa_config(bits=bits, group_size=group_size))
    assert isinstance(opt, torch.optim.AdamW)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(engine, 12)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    layers = lowbit_modules(model)
    assert moved == {f"{n}.qweight.scale" for n in layers}  # codes, zeros, embeddings, norms: bit for bit
    assert all(m.qweight.bits == bits for m in layers.values())
    assert losses[-1] < losses[0] - 0.2


def test_nonfinite_loss_skips_the_update(tiny_llama):
    model = tiny_llama()
    engine, opt, _, _ = qft_ds.initialize(model=model, config=peqa_config())
    train(engine, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch()
    engine.backward(engine(input_ids=x, labels=x).loss * float("nan"))
    engine.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert engine.skipped_steps == 1 and opt.overflow
    assert train(engine, 1)  # and training goes on


@pytest.fixture
def trained_peqa(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = peqa_config()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    train(engine, 3, vocab=12)
    ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=3, ds_config=cfg,
                           tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    return model.eval(), ckpt


def test_lowbit_export_round_trips_bit_for_bit(trained_peqa, tmp_path):
    model, ckpt = trained_peqa
    out = tmp_path / "peqa-out"
    assert main(["export", str(ckpt), str(out), "--lowbit"]) == 0
    loaded = load_peqa(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, LowBitLinear)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = batch(5, vocab=12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    packed = sum(m.qweight.packed.numel() for m in lowbit_modules(loaded).values())
    assert packed == sum(m.in_features * m.out_features for m in lowbit_modules(loaded).values()) // 2


def test_dense_export_loads_in_plain_transformers(trained_peqa, tmp_path):
    from transformers import AutoModelForCausalLM
    model, ckpt = trained_peqa
    out = tmp_path / "dense"
    assert main(["export", str(ckpt), str(out), "--dtype", "fp32"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    x = batch(6, vocab=12)
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_export_flags_must_fit_the_method(trained_peqa, tmp_path, capsys):
    _, ckpt = trained_peqa
    assert main(["export", str(ckpt), str(tmp_path / "a"), "--int8"]) == 2
    assert "--lowbit" in capsys.readouterr().err
