"""The random-init LLaMA shapes of bench/memory_speed.py and how each method's model of a shape is built.

A shape is a LlamaConfig's dimensions plus the batch x seq it is measured at (the targets of issue 15).
qft's model is drawn and quantized weight by weight on the device (qft_ds.nn.streaming.build_random): a 70B
shape in bf16 (141 GB) fits neither the GPU next to anything else nor the GPU machine's host memory. The
baselines build the whole model in their own dtype on the device.
"""
from __future__ import annotations

import time

import torch

SHAPES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, batch=8, seq=512),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, batch=1, seq=512),
    # Llama-3-8B: 128k vocabulary (the fp32 logits of 2048 tokens are 1.05 GB), grouped-query attention
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, batch=1, seq=2048),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, batch=1, seq=2048),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, batch=1, seq=2048),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, batch=2, seq=64),
}
RUN_KEYS = ("batch", "seq")  # how a shape is measured, not part of its config


def batch_seq(shape: str, batch: int | None = None, seq: int | None = None) -> tuple[int, int]:
    """The shape's batch x seq, or the overrides given."""
    return batch or SHAPES[shape]["batch"], seq or SHAPES[shape]["seq"]


def llama_config(shape: str, seq: int | None = None):
    from transformers import LlamaConfig
    dims = {k: v for k, v in SHAPES[shape].items() if k not in RUN_KEYS}
    seq = seq or SHAPES[shape]["seq"]
    return LlamaConfig(**dims, max_position_embeddings=max(2048, seq), tie_word_embeddings=False)


def shape_sizes(shape: str) -> dict:
    """{"params": every parameter, "weight_elements": those int8 conversion quantizes (Linear, Embedding)},
    counted on a skeleton on the meta device (no memory, instant even at 70B)."""
    from torch import nn
    from qft_ds.nn.streaming import skeleton
    model = skeleton(llama_config(shape))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return {"params": sum(p.numel() for p in model.parameters()), "weight_elements": sum(w.numel() for w in weights)}


def _checkpointed(model, reentrant):
    from qft_ds.nn.qmodules import enable_checkpointing
    enable_checkpointing(model, reentrant)
    model.config.use_cache = False
    return model


def build(shape, dtype, device, reentrant=False, seq=None):
    """A random-init LLaMA of `shape` made in `dtype` on `device` (no fp32 copy first: a 70B one would be 282
    GB), checkpointed as HF does by default (non-reentrant) unless `reentrant`."""
    from transformers import AutoModelForCausalLM
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, seq), dtype=dtype)
    return _checkpointed(model, reentrant)


class BuildProgress:
    """`on_weight` for the streaming build: a line about every 10% of the shape's weight elements, with the
    weights and elements done (building a 70B shape takes minutes)."""

    def __init__(self, total_elements: int, log=print, every: float = 0.1):
        self.total, self.log, self.every = total_elements, log, every
        self.done = self.weights = 0
        self.next = every
        self.t0 = time.perf_counter()

    def __call__(self, qw) -> None:
        self.done += qw.numel
        self.weights += 1
        if self.done >= self.next * self.total:
            self.log(f"    built {self.weights} weights, {self.done / 1e9:.3g} of {self.total / 1e9:.3g} G elements "
                     f"({100 * self.done / self.total:.0f}%; last {tuple(qw.shape)}) in "
                     f"{time.perf_counter() - self.t0:.1f} s")
            while self.next * self.total <= self.done:
                self.next += self.every


def build_quantized(shape, device, fuse=True, seq=None, log=None):
    """The same shape for qft: each weight is drawn in bf16 on the device and quantized at once, so no
    full-precision copy of more than one layer exists. `log`: a line about every 10% of the elements."""
    from qft_ds.nn.streaming import build_random
    on_weight = BuildProgress(shape_sizes(shape)["weight_elements"], log) if log is not None else None
    model, _ = build_random(llama_config(shape, seq), device, dtype=torch.bfloat16, compute_dtype=torch.bfloat16,
                            fuse_projections=fuse, on_weight=on_weight)
    return _checkpointed(model, False)
