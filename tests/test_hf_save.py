"""`save_pretrained` of a converted model writes dense HF weights that plain transformers loads exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

import qft_ds
from qft_ds.hf_save import DenseSaveError, qft_dense

IDS = torch.randint(0, 12, (2, 12), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits.float()


def load_plain(path):
    """AutoModelForCausalLM.from_pretrained, asserting that every weight came from the folder."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def saved_keys(path):
    return set(load_file(path / "model.safetensors"))


@pytest.mark.parametrize("fuse", [True, False])
def test_save_pretrained_writes_dense_weights_that_load_exactly(tiny_llama, tmp_path, fuse):
    model = tiny_llama(vocab=12)  # tied embedding / LM head
    qft_ds.convert_model(model, group_size=32, fuse_projections=fuse)
    with torch.no_grad():  # move the int8 state away from the fp32 weights it came from
        for w in qft_ds.quantized_weights(model):
            w.codes.copy_(torch.randint_like(w.codes, -127, 128))
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    keys = saved_keys(tmp_path / "hf")
    assert not [k for k in keys if "qweight" in k or k.endswith(".anchor")]
    assert "model.layers.0.self_attn.k_proj.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    hf = load_plain(tmp_path / "hf")
    assert isinstance(hf.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    err = (logits(hf) - logits(model)).abs().max().item()
    assert err < 1e-4, err


def test_save_pretrained_keeps_the_loaded_dtype(tiny_llama, tmp_path):
    model = tiny_llama(vocab=12, tie=False).to(torch.bfloat16)
    qft_ds.convert_model(model, group_size=32)
    model.eval()
    model.save_pretrained(tmp_path / "bf16")
    hf = load_plain(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16 and "lm_head.weight" in saved_keys(tmp_path / "bf16")
    ref = logits(model)
    assert (logits(hf) - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    model.save_pretrained(tmp_path / "fp32", qft_dtype=torch.float32)  # or ask for another
    assert load_plain(tmp_path / "fp32").dtype == torch.float32


def test_state_dict_stays_the_int8_state(tiny_llama):
    """DeepSpeed's and qft_ds's checkpoints resume from state_dict(): it must keep the int8 tensors."""
    model = tiny_llama(vocab=12)
    qft_ds.convert_model(model, group_size=32)
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.down_proj.qweight.codes"].dtype == torch.int8
    assert "model.layers.0.mlp.down_proj.weight" not in sd


def test_a_sharded_weight_is_refused_not_written(tiny_llama):
    model = tiny_llama(vocab=12)
    qft_ds.convert_model(model, group_size=32)
    sd = model.state_dict()
    key = "model.layers.0.mlp.down_proj.qweight.codes"
    sd[key] = sd[key][: sd[key].numel() // 2]  # what a ZeRO-3 rank holds
    with pytest.raises(DenseSaveError, match="qft_ds export"):
        qft_dense(model, sd, torch.float32)


def test_peqa_saves_dense_and_qst_refuses(tiny_llama, tmp_path):
    from qft_ds.methods.peqa import convert_peqa
    from qft_ds.methods.qst import build_qst
    model = tiny_llama(vocab=12)
    convert_peqa(model, bits=4, group_size=32)
    model.eval()
    model.save_pretrained(tmp_path / "peqa")
    hf = load_plain(tmp_path / "peqa")
    assert (logits(hf) - logits(model)).abs().max().item() < 1e-4
    backbone = tiny_llama(vocab=12)
    build_qst(backbone, group_size=32)
    with pytest.raises(DenseSaveError, match="QST model has no Hugging Face form"):
        backbone.save_pretrained(tmp_path / "qst")
    assert not (tmp_path / "qst" / "model.safetensors").exists()
