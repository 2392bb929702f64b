"""Tiny random causal LMs of popular transformers families, built from their config classes (no hub).

FAMILIES entries: (config class name, its keyword arguments, the fp32 weight matrices conversion is expected
to list, as name patterns); MORE adds a logits tolerance. 2 layers, hidden 64, vocab 128: real code paths,
fake weights.
"""
from __future__ import annotations

import re

import torch

V, H = 128, 64
BASE = dict(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ROUTER = r"\.mlp\.gate\.weight$"

FAMILIES = {
    "llama": ("LlamaConfig", {}, []),
    "mistral": ("MistralConfig", {}, []),
    "qwen2": ("Qwen2Config", {}, []),
    "qwen3": ("Qwen3Config", dict(head_dim=16), []),
    "phi3": ("Phi3Config", {}, []),
    "gemma": ("GemmaConfig", dict(head_dim=16), []),
    "gemma2": ("Gemma2Config", dict(head_dim=16), []),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16), []),
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=2, n_head=4, n_positions=64), []),
    "falcon": ("FalconConfig", dict(num_kv_heads=2), []),
    "opt": ("OPTConfig", dict(ffn_dim=2 * H, word_embed_proj_dim=H), [r"\.embed_positions\.weight$"]),
    "gpt_neox": ("GPTNeoXConfig", {}, []),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), [ROUTER]),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         head_dim=16), [ROUTER]),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                                             topk_group=1), [ROUTER]),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
                [r"\.mlp\.router\.weight$"]),
    "qwen3_5": ("Qwen3_5TextConfig", dict(head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                                          linear_num_key_heads=2, linear_num_value_heads=4,
                                          layer_types=["linear_attention", "full_attention"]),
                [r"\.linear_attn\.conv1d\.weight$"]),
}

# Converted only (completeness, ties, logits): the other families of issue 17's survey, cheap to build.
# Entries: (config class, kwargs, expected fp32 patterns, logits tolerance at conversion).
MORE = {
    "phi": ("PhiConfig", {}, [], 0.02),
    "starcoder2": ("Starcoder2Config", {}, [], 0.02),
    "olmo2": ("Olmo2Config", {}, [], 0.02),
    "stablelm": ("StableLmConfig", {}, [], 0.02),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4), [], 0.02),
    "gptj": ("GPTJConfig", dict(n_embd=H, n_layer=2, n_head=4, n_positions=64, rotary_dim=8), [], 0.02),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=H, n_layer=2, n_head=4, n_positions=64), [], 0.02),
    "cohere": ("CohereConfig", {}, [], 0.02),
    "granite": ("GraniteConfig", {}, [], 0.02),
    "smollm3": ("SmolLM3Config", {}, [], 0.02),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32), [ROUTER], 0.02),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2), [ROUTER], 0.02),
    "qwen3_next": ("Qwen3NextConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                                           linear_num_key_heads=2, linear_num_value_heads=4,
                                           layer_types=["linear_attention", "full_attention"]),
                   [ROUTER, r"\.linear_attn\.conv1d\.weight$"], 0.02),
    # random-init Gemma 4 turns the int8 weights' 0.5% error into ~7% on the logits (its embedding alone: 6%;
    # Gemma 3 with the same weights: 1.6%): the model's sensitivity, not a conversion error
    "gemma4": ("Gemma4TextConfig", dict(head_dim=16, vocab_size_per_layer_input=V, hidden_size_per_layer_input=16),
               [], 0.1),
}


def make(family: str, seed: int = 0):
    """(model, config) of `family`, or pytest.skip if this transformers lacks it."""
    import pytest
    import transformers
    cname, kw = (FAMILIES.get(family) or MORE[family])[:2]
    cls = getattr(transformers, cname, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cname}")
    cfg = cls(**{**BASE, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.float(), cfg


def expected_fp32(family: str, name: str) -> bool:
    return any(re.search(p, name) for p in (FAMILIES.get(family) or MORE[family])[2])
