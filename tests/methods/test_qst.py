"""QST: exact logits at initialisation, a backbone that never changes or sees a gradient, a small graph."""
import json
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds.methods import QSTModel, build_qst
from qft_ds.methods.qst import Downsample
from qft_ds.nn.lowbit import LowBitLinear

ROOT = Path(__file__).resolve().parents[2]


def qst_config(lr=1e-2, **qft):
    cfg = json.loads((ROOT / "ds_configs" / "qst.json").read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["scheduler"]["params"].update(total_num_steps=20, warmup_num_steps=1)
    cfg["qft"].update({"r": 4, "adapter_rank": 4, **qft})  # tiny model: hidden 64 -> side width 16
    return cfg


def ids(seed=0):
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("downsample", ["adapter", "linear", "maxpool", "avgpool"])
def test_at_init_logits_equal_the_frozen_models_exactly(tiny_llama, downsample):
    model = tiny_llama(layers=3)
    qst = build_qst(model, r=4, downsample=downsample, adapter_rank=4)
    assert isinstance(model.model.layers[0].mlp.up_proj, LowBitLinear)
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits  # the frozen low-bit backbone alone
    assert torch.equal(qst(input_ids=x).logits, want)


def test_backbone_untouched_no_gradient_reaches_it_and_side_learns(tiny_llama):
    model = tiny_llama()
    engine, opt, _, _ = qft_ds.initialize(model=model, config=qst_config())
    qst = engine.module
    assert isinstance(qst, QSTModel) and qst.backbone is model
    assert not any(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    side_before = [p.detach().clone() for p in qst.side_parameters()]
    losses = []
    for i in range(15):
        x = ids(i % 2)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        assert all(p.grad is None for p in model.parameters())  # after backward, before the step
        engine.step()
        losses.append(loss.item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(side_before, qst.side_parameters()))
    assert qst.alpha.item() < 1.0
    assert losses[-1] < losses[0] - 0.01


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return total[0]


def test_backbone_keeps_no_activations_for_backward(tiny_llama):
    """Only the side network's graph is kept: far less than a trainable copy of the backbone keeps."""
    x = ids()
    full = tiny_llama(layers=4)
    full_bytes = _saved_bytes(lambda: full(input_ids=x).logits)
    qst = build_qst(tiny_llama(layers=4), r=4, adapter_rank=4)
    qst_bytes = _saved_bytes(lambda: qst(input_ids=x).logits)
    assert qst_bytes < 0.3 * full_bytes  # measured 0.20 at 4 layers, 0.18 at 8


def test_r_must_divide_the_hidden_size(tiny_llama):
    with pytest.raises(ValueError, match="'qft.r' = 5 must divide"):
        build_qst(tiny_llama(), r=5)


@pytest.mark.parametrize("kind", ["adapter", "linear", "maxpool", "avgpool"])
def test_downsample_shapes(kind):
    h = torch.randn(2, 3, 64)
    assert Downsample(kind, 64, 16, rank=4)(h).shape == (2, 3, 4)


def test_maxpool_takes_the_max_of_each_run_of_r_features():
    h = torch.arange(8.0).view(1, 1, 8)
    assert Downsample("maxpool", 8, 4)(h).flatten().tolist() == [3.0, 7.0]


def trained_qst(tiny_llama, steps=3):
    """A QST engine after a few steps at a high lr: alpha below 1, so the side network shapes the logits."""
    cfg = qst_config(lr=5e-2)
    engine, opt, _, _ = qft_ds.initialize(model=tiny_llama(), config=cfg)
    for i in range(steps):
        x = ids(i)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return engine, opt, cfg


def greedy(model, x, n):
    """Greedy decoding by full forwards, no cache: what generate must reproduce."""
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


def test_generate_follows_the_side_network_with_and_without_cache(tiny_llama):
    model = tiny_llama(layers=2, tie=False)  # tied, a random model only repeats its last token, as would QST
    model.generation_config.eos_token_id = None  # greedy() below runs on past an end of sequence
    qst = build_qst(model, r=4, adapter_rank=4)
    with torch.no_grad():  # a side network that owns the output: its logits differ from the backbone's
        qst.alpha.zero_()
        for p in qst.side_parameters():
            p.copy_(torch.randn_like(p))
    x = ids()[:, :5]
    with torch.no_grad():
        assert not torch.allclose(qst(input_ids=x).logits, model(input_ids=x).logits, atol=1e-2)
    want = greedy(qst, x, 6)
    cached = qst.generate(input_ids=x, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = qst.generate(input_ids=x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, want) and torch.equal(uncached, want)
    assert not torch.equal(model.generate(input_ids=x, max_new_tokens=6, do_sample=False), want)
    assert "forward" not in model.__dict__  # the backbone's own forward is back
    sampled = qst.generate(input_ids=x, max_new_tokens=4, do_sample=True, top_k=5)  # any HF strategy
    assert sampled.shape == (x.shape[0], x.shape[1] + 4)


def test_logits_to_keep_computes_only_the_last_positions(tiny_llama):
    qst = build_qst(tiny_llama(), r=4, adapter_rank=4)
    with torch.no_grad():
        qst.alpha.fill_(0.5)
        full, last = qst(input_ids=ids()).logits, qst(input_ids=ids(), logits_to_keep=1).logits
    assert last.shape[1] == 1 and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)


def test_export_loads_back_exactly_and_plain_transformers_refuses(tiny_llama, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qft_ds import checkpoint
    from qft_ds.cli import main
    from qft_ds.methods import load_qst
    engine, opt, cfg = trained_qst(tiny_llama)
    qst = engine.module.eval()
    assert qst.alpha.item() < 1.0
    ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=3, ds_config=cfg)
    saved = checkpoint.read_tensors(ckpt / "model.safetensors")
    assert "alpha" in saved and "backbone.model.layers.0.mlp.up_proj.qweight.packed" in saved
    out = tmp_path / "out"
    assert main(["export", str(ckpt), str(out)]) == 0
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="qft_ds_qst"):  # loudly refused, never random weights
            load(out)
    back = load_qst(out)
    x = ids(7)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, qst(input_ids=x).logits)
    assert torch.equal(back.generate(input_ids=x[:, :4], max_new_tokens=5, do_sample=False),
                       qst.generate(input_ids=x[:, :4], max_new_tokens=5, do_sample=False))
    assert main(["export", str(ckpt), str(tmp_path / "int8"), "--int8"]) == 2
    assert "QST checkpoint" in capsys.readouterr().err


def test_save_pretrained_round_trips_and_the_backbone_alone_refuses(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from qft_ds.hf_save import DenseSaveError
    from qft_ds.methods import load_qst
    engine, _, _ = trained_qst(tiny_llama, steps=2)
    qst = engine.module.eval()
    qst.save_pretrained(tmp_path / "a")
    qst.save_pretrained(tmp_path / "b", state_dict=qst.state_dict())  # as accelerate hands it
    x = ids(3)
    with torch.no_grad():
        want = qst(input_ids=x).logits
        for d in ("a", "b"):
            assert torch.equal(load_qst(tmp_path / d)(input_ids=x).logits, want)
    with pytest.raises(ValueError, match="qft_ds_qst"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    with pytest.raises(TypeError, match="max_shard_size"):
        qst.save_pretrained(tmp_path / "c", max_shard_size="1GB")
    with pytest.raises(DenseSaveError, match="load_qst"):
        qst.backbone.save_pretrained(tmp_path / "d")
