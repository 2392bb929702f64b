"""bf16 compute: dtypes stay consistent through attention, with and without the autocast wrapper."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qft_ds.nn.convert import convert_model
from qft_ds.nn.precision import autocast_forward


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, use_cache=False)
    return LlamaForCausalLM(cfg)


def test_bf16_compute_without_kv_cache_runs_and_matches_fp32():
    """use_cache=False (training) used to hand SDPA an fp32 q/k (RoPE) and a bf16 v."""
    ids = torch.randint(0, 256, (2, 16))
    ref = _model()
    want = ref(input_ids=ids, labels=ids).loss
    model = _model()
    convert_model(model, compute_dtype=torch.bfloat16, outlier_frac=0.01)
    plain = model(input_ids=ids, labels=ids).loss
    autocast_forward(model)
    auto = model(input_ids=ids, labels=ids).loss
    auto.backward()
    for loss in (plain, auto):
        assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) < 0.02 * want.item()
    assert autocast_forward(model).forward._qft_autocast == torch.bfloat16  # wrapping twice is a no-op
