"""Every popular architecture, converted fully (issue 17): tiny random models of each family (tests/nn/families.py).

Per family: every weight matrix is quantized or listed at start-up with its reason (and only the expected
ones are listed; MoE experts' 3-D Parameters are quantized per expert slice, only routers stay fp32), tied
embeddings stay one HybridWeight, the state line counts every parameter, the logits at conversion are within ~2%, fp32
matrices get weight decay, the loss falls over a few steps, `generate` runs, and `save_pretrained` writes a
folder that plain transformers loads with the converted model's logits. A family this transformers lacks
is skipped, with the reason.
"""
import copy
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds.nn.experts import QExperts, is_experts_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import FAMILIES, MORE, V, expected_fp32, make  # noqa: E402

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "QFTLion", "params": {"lr": 5e-3, "weight_decay": 0.1}},
          "qft": {}, "bf16": {"enabled": False}}
IDS = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(1))


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _is_matrix(name, p) -> bool:
    return p.dim() >= 2 and "bias" not in name.rsplit(".", 1)[-1]


def _check_complete_and_tied(family, model, cfg, log: str) -> None:
    """Every matrix left is listed (loudly, with its reason), only the expected ones are, and a tied embedding
    and head read one HybridWeight."""
    listed = {e["name"]: e for e in model._qft_fp32}
    assert {n for n, p in model.named_parameters() if _is_matrix(n, p)} == set(listed)
    # MoE experts: every transformers experts module became a QExperts (int8 per expert slice)
    assert [n for n, m in model.named_modules() if is_experts_module(m) and not isinstance(m, QExperts)] == []
    assert [n for n in listed if not expected_fp32(family, n)] == []
    for pattern in (FAMILIES.get(family) or MORE[family])[2]:
        assert any(re.search(pattern, n) for n in listed), pattern
    for name, e in listed.items():
        assert f"{name} {e['shape']}" in log and e["reason"] in log
        assert e["bytes"] == e["params"] * 4
    assert bool(listed) == ("stay fp32" in log or "stays fp32" in log)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert hasattr(emb, "qweight") and hasattr(head, "qweight")
    if getattr(cfg, "tie_word_embeddings", False):
        assert emb.qweight is head.qweight and emb.qweight.n_uses == 2
    else:
        assert emb.qweight is not head.qweight


@pytest.mark.parametrize("family", list(MORE))
def test_more_families_convert_fully(family, caplog):
    """Conversion as initialize does it (convert, fuse norms): complete, tied, logits close."""
    from qft_ds.nn import convert_model
    from qft_ds.nn.norms import fuse_rms_norms
    model, cfg = make(family)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        convert_model(model)
    fuse_rms_norms(model)
    _check_complete_and_tied(family, model, cfg, caplog.text)
    with torch.no_grad():
        assert _rel(model(input_ids=IDS).logits, want) < MORE[family][3]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_converts_fully_trains_generates_and_exports(family, tmp_path, caplog):
    from transformers import AutoModelForCausalLM
    model, cfg = make(family)
    ref = copy.deepcopy(model).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        engine, opt, _, _ = qft_ds.initialize(model=model, config=copy.deepcopy(CONFIG))

    # complete: every matrix left is listed (loudly, with its reason), and only the expected ones are
    _check_complete_and_tied(family, model, cfg, caplog.text)
    state = opt.state_nbytes()  # what train.py's state line reports: every parameter, once
    assert state["quantized_params"] + state["float_params"] == n_params

    # fp32 matrices are decayed like the quantized ones; norms and biases are not
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (_is_matrix(n, p) or hasattr(p, "_qft_weight")), n

    model.eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    assert _rel(got, want) < 0.025

    model.train()
    losses = []
    for _ in range(4):
        loss = engine(input_ids=IDS, labels=IDS).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses

    model.eval()
    out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)

    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("qweight" in k for k in hf.state_dict())
    with torch.no_grad():
        back = hf(input_ids=IDS).logits
    assert _rel(back, trained) < 1e-5
    if saved.get("tie_word_embeddings"):
        assert hf.get_input_embeddings().weight is hf.get_output_embeddings().weight


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "falcon", "gpt_oss"])
def test_checkpoint_exports_reload_with_the_same_logits(family, tmp_path):
    """`qft_ds export` of a checkpoint: the dense folder loads in plain transformers (GPT-2's Conv1D weights in
    their [in, out] layout, Gemma's tied scaled embedding, GPT-OSS's expert slices stacked back into their
    transposed 3-D Parameters beside the experts' biases), and the int8 export rebuilds the same modules."""
    from transformers import AutoModelForCausalLM

    from qft_ds import checkpoint
    from qft_ds.export import export, load_int8
    model, _ = make(family)
    engine, opt, _, _ = qft_ds.initialize(model=model, config=copy.deepcopy(CONFIG))
    for _ in range(2):
        engine.backward(engine(input_ids=IDS, labels=IDS).loss)
        engine.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=2, ds_config=copy.deepcopy(CONFIG))
    dense = AutoModelForCausalLM.from_pretrained(export(ckpt, tmp_path / "hf", dtype="fp32")).eval()
    int8 = load_int8(export(ckpt, tmp_path / "int8", int8=True))
    assert [type(m) for m in int8.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert _rel(dense(input_ids=IDS).logits, want) < 1e-5
        assert _rel(int8(input_ids=IDS).logits, want) < 1e-5
